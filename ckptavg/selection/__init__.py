"""Choosing among checkpoints on held-out images: greedy soups, window and profile search,
and SWAG (a posterior from the same snapshots)."""
