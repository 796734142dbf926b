"""Checkpoint formats behind one small interface (see reader.py)."""

from ckptavg.io.reader import Reader, TensorInfo, open_checkpoint
from ckptavg.io.writer import TensorSpec, make_writer

__all__ = ["Reader", "TensorInfo", "TensorSpec", "make_writer", "open_checkpoint"]
