"""Paper reproductions: prediction ensembles, optima width, the Table 1 protocol."""
