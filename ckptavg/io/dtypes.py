"""Tensor dtypes without torch.

A reader describes a tensor (`TensorSpec`) before anything reads it, and averaging
safetensors files needs no torch at all (the engine's arithmetic is numpy's): `DType`
names a dtype the way torch does (`str` is "torch.float32", `itemsize`, `is_floating_point`,
and it compares equal to the torch dtype of that name), so the formats and the engine work
the same whether torch has been imported or not. `.torch` gives the torch dtype (importing
torch); `dtype_of` goes the other way.

torch itself is imported on demand by `ckptavg.lazy.import_torch`, the one place that does.
"""

from __future__ import annotations

import threading

from ckptavg.lazy import import_torch


class DType:
    """One tensor dtype: its safetensors code (None where safetensors has none), torch name,
    bytes per element and whether it is averaged (floating point)."""

    __slots__ = ("code", "name", "itemsize", "is_floating_point")

    def __init__(self, code: str | None, name: str, itemsize: int, floating: bool):
        for k, v in (("code", code), ("name", name), ("itemsize", itemsize),
                     ("is_floating_point", floating)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a DType does not change")  # one object per dtype, shared

    def __setstate__(self, state) -> None:
        raise TypeError("a DType does not change")

    def __repr__(self) -> str:
        return f"torch.{self.name}"  # as torch prints its dtypes (messages, inspect)

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return self.name == other.name
        if _is_torch_dtype(other):
            return str(other) == f"torch.{self.name}"
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(("ckptavg.DType", self.name))

    def __reduce__(self):
        return (_by_name, (self.name,))

    @property
    def torch(self):
        """The torch dtype of this name (imports torch)."""
        torch = import_torch()
        dt = getattr(torch, self.name, None)
        if not _is_torch_dtype(dt):
            raise TypeError(f"this torch has no dtype {self.name}")
        return dt


def _is_torch_dtype(x: object) -> bool:
    t = type(x)
    return t.__name__ == "dtype" and t.__module__ == "torch"


# safetensors codes; every dtype torch files may hold is added by name when first seen.
_TABLE = (
    ("F64", "float64", 8, True), ("F32", "float32", 4, True), ("F16", "float16", 2, True),
    ("BF16", "bfloat16", 2, True), ("F8_E4M3", "float8_e4m3fn", 1, True),
    ("F8_E5M2", "float8_e5m2", 1, True), ("I64", "int64", 8, False), ("I32", "int32", 4, False),
    ("I16", "int16", 2, False), ("I8", "int8", 1, False), ("U8", "uint8", 1, False),
    ("BOOL", "bool", 1, False), ("U16", "uint16", 2, False), ("U32", "uint32", 4, False),
    ("U64", "uint64", 8, False),
)
_BY_NAME: dict[str, DType] = {name: DType(code, name, size, fl) for code, name, size, fl in _TABLE}
_STANDARD = frozenset(_BY_NAME)
DTYPES: dict[str, DType] = {d.code: d for d in _BY_NAME.values() if d.code}  # code -> DType
CODES: dict[DType, str] = {d: c for c, d in DTYPES.items()}  # DType -> code
_lock = threading.Lock()

float64, float32, float16, bfloat16 = (_BY_NAME[n] for n in ("float64", "float32", "float16",
                                                             "bfloat16"))


def _by_name(name: str) -> DType:
    try:
        return _BY_NAME[name]
    except KeyError:
        return dtype_of(getattr(import_torch(), name))


def standard(name: str) -> DType | None:
    """The DType of a name in the table above (never one added from a torch file)."""
    return _BY_NAME[name] if name in _STANDARD else None


def dtype_of(dt) -> DType:
    """The DType of a torch dtype (or a DType, returned as it is)."""
    if isinstance(dt, DType):
        return dt
    if not _is_torch_dtype(dt):
        raise TypeError(f"not a dtype: {dt!r}")
    name = str(dt)[len("torch."):]
    with _lock:
        if name not in _BY_NAME:  # complex, quantised, the rarer float8s: torch files only
            _BY_NAME[name] = DType(None, name, dt.itemsize, dt.is_floating_point)
        return _BY_NAME[name]
