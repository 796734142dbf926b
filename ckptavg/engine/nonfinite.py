"""Why an average is not finite: the input that holds NaN/Inf, or an overflow."""

from __future__ import annotations

import numpy as np

from ckptavg.engine import arith
from ckptavg.errors import NonFiniteError
from ckptavg.io import ReaderBase
from ckptavg.io.dtypes import DType
from ckptavg.io.files import pread_extent

CHUNK = 1 << 16  # elements read and checked at a time


def raise_nonfinite(readers: list[ReaderBase], key: str, dtype: DType) -> None:
    for r in readers:
        bad = _count_nonfinite(r, key)
        if bad:
            raise NonFiniteError(
                f"{r.path}: tensor {key!r} holds {bad} NaN/Inf value(s); "
                "drop that checkpoint, or allow non-finite values (--allow-nonfinite) to average anyway"
            )
    raise NonFiniteError(f"tensor {key!r}: its average overflows (in a float32 sum, or in the "
                         f"output dtype {dtype.name}); accumulate in "
                         "float64 and write a wider dtype (--dtype float32)")


def _count_nonfinite(reader: ReaderBase, key: str) -> int:
    """NaN/Inf values in one input's tensor (read in chunks where it can be located)."""
    info = reader.info(key)
    kind = arith.storage(info.dtype)
    ext = reader.locate(key)
    flat = None if ext is not None else arith.as_numpy(reader.read(key), kind)
    s = arith.Scratch(CHUNK, np.dtype(np.float64))
    raw = np.empty(CHUNK * kind.itemsize, np.uint8) if flat is None else None
    bad = 0
    for off in range(0, info.numel, CHUNK):
        n = min(CHUNK, info.numel - off)
        if flat is None:
            pread_extent(ext, memoryview(raw[: n * kind.itemsize]), off * kind.itemsize)
            src = raw[: n * kind.itemsize].view(kind)
        else:
            src = flat[off:off + n]
        values = s.cast[:n]
        arith.widen(values, src, info.dtype, s)
        bad += int(n - np.isfinite(values).sum())
    if flat is not None:
        reader.release(key)
    return bad

