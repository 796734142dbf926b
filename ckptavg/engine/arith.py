"""The averaging engine's arithmetic, on raw little-endian buffers held by numpy.

Tensors arrive as the bytes a file stores (read with pread) and leave as the bytes the
output stores; in between, each chunk is widened into a float64 (or float32) accumulator,
folded, divided once and rounded once to the output dtype. numpy holds the buffers because
its import takes 0.1 s where torch's takes 1.3 s, and averaging safetensors files needs no
torch at all.

- Widening is exact: float16/32/64 by numpy's casts, bfloat16 by moving its 16 bits into
  the top of a float32, the one-byte floats (float8) through a 256-entry table decoded from
  their bit fields here (`_decode`; no torch, no ml_dtypes, whose import takes 0.56 s).
- Rounding is once, to nearest, ties to even, from the accumulator: float32 and float16 by
  numpy's casts (correctly rounded from float64), bfloat16 by `round_bfloat16` below. torch's
  own `.to()` goes through float32 on the way to float16/bfloat16, rounding twice, which
  differed from the once-rounded value in 1 element in 22,000 (float16) and 200,000
  (bfloat16) of the float64 mean of 3 float32 N(0, 1) tensors. The one-byte floats are
  rounded once from the accumulator: round-to-odd to float32, then to nearest even in
  their bits (`to_odd_float32`, `_encode`): ml_dtypes' float64 cast's codes, bit for bit,
  in half its time (torch's own goes through float32 to nearest, twice rounded).
- Weights multiply then add (two roundings in float64), as the reference sums in the tests
  do; torch's `add_(alpha=w)` fuses them (one rounding), which differed in the last bit.
"""

from __future__ import annotations

import numpy as np

from ckptavg.io.dtypes import DType
from ckptavg.lazy import import_torch

NATIVE = {"float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


def storage(dtype: DType) -> np.dtype:
    """The numpy dtype a floating tensor's raw bytes are viewed as (bfloat16: its uint16
    bit patterns; one-byte floats: uint8)."""
    if dtype.name in NATIVE:
        return NATIVE[dtype.name]
    if dtype.name == "bfloat16":
        return np.dtype("<u2")
    if dtype.is_floating_point and dtype.itemsize == 1:
        return np.dtype("u1")
    raise TypeError(f"cannot average tensors of dtype {dtype.name}")


_tables: dict[tuple[str, str], np.ndarray] = {}


# The float8 formats numpy is taught here, bit by bit, without a library import (ml_dtypes
# takes 0.56 s to import): mantissa bits, exponent bias, the largest finite magnitude's
# code, the code a larger magnitude becomes (infinity for e5m2, NaN for the others) and
# whether the format has no negative zero (the "fnuz" ones, whose 0x80 is NaN).
FLOAT8 = {
    "float8_e4m3fn": (3, 7, 0x7E, 0x7F, False),
    "float8_e5m2": (2, 15, 0x7B, 0x7C, False),
    "float8_e4m3fnuz": (3, 8, 0x7F, 0x80, True),
    "float8_e5m2fnuz": (2, 16, 0x7F, 0x80, True),
}


def float8_max(dtype: DType) -> float:
    """The largest finite value of a one-byte float."""
    return float(_table(dtype, np.dtype(np.float64))[FLOAT8[dtype.name][2]])


def _decode(name: str) -> np.ndarray:
    """The value of each of the 256 codes of a FLOAT8 format (float64, exact)."""
    m, bias, _, _, fnuz = FLOAT8[name]
    codes = np.arange(256)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> m) & (0x7F >> m)
    mant = codes & ((1 << m) - 1)
    value = np.where(exp == 0, mant * 2.0 ** (1 - bias - m),
                     (1 + mant / 2.0 ** m) * 2.0 ** (exp - bias)) * sign
    if fnuz:
        value[0x80] = np.nan
    elif name == "float8_e5m2":
        value[(exp == 0x1F) & (mant == 0)] = np.inf * sign[(exp == 0x1F) & (mant == 0)]
        value[(exp == 0x1F) & (mant != 0)] = np.nan
    else:  # e4m3fn: only S.1111.111 is NaN
        value[(codes & 0x7F) == 0x7F] = np.nan
    return value


def _encode(out: np.ndarray, f: np.ndarray, name: str) -> None:
    """out (codes) = float32 `f` rounded once to nearest even to a FLOAT8 format; a larger
    magnitude than the largest finite one becomes infinity (e5m2) or NaN, NaN stays NaN."""
    m, bias, top, over, fnuz = FLOAT8[name]
    bits = f.view(np.uint32)
    sign = (bits >> 31).astype(np.uint8) << 7
    mag = bits & np.uint32(0x7FFFFFFF)
    shift = 23 - m
    r = (mag >> shift) & np.uint32(1)
    r += np.uint32((1 << (shift - 1)) - 1)
    r += mag
    r >>= shift  # the magnitude rounded to m bits: (float32 exponent << m) | mantissa
    code = r.astype(np.int64) - ((127 - bias) << m)
    small = code < (1 << m)  # below the smallest normal: a multiple of the subnormal step
    if small.any():
        sub = np.abs(f[small]).astype(np.float64) * 2.0 ** (bias - 1 + m)
        code[small] = np.rint(sub).astype(np.int64)
    nan = mag > np.uint32(0x7F800000)
    overflow = code > top
    code = np.where(overflow, over & 0x7F, code)
    result = code.astype(np.uint8) | sign
    if fnuz:
        result[code == 0] = 0  # no negative zero
        result[overflow | nan] = over
    else:
        result[nan] = 0x7F if name == "float8_e4m3fn" else 0x7E
    out[...] = result


def _table(dtype: DType, acc: np.dtype) -> np.ndarray:
    """The value of each of the 256 bit patterns of a one-byte float, in `acc` (exact)."""
    key = (dtype.name, acc.str)
    if key not in _tables:
        _tables[key] = _decode(dtype.name).astype(acc)
    return _tables[key]


class Scratch:
    """Per-thread scratch for chunks of up to `n` elements."""

    def __init__(self, n: int, acc: np.dtype):
        self.acc = np.empty(n, acc)  # a chunk of the sum
        self.cast = np.empty(n, acc)  # an input's chunk, widened
        self.u32 = np.empty(n, np.uint32)
        self.u64 = np.empty(n, np.uint64)


def widen(dst: np.ndarray, src: np.ndarray, dtype: DType, s: Scratch) -> None:
    """dst = the values of `src` (raw storage of `dtype`), exactly (dst is float64/32)."""
    if dtype.name in NATIVE:
        np.copyto(dst, src, casting="unsafe")
    elif dtype.name == "bfloat16":
        u = s.u32[: src.size]
        np.left_shift(src, 16, out=u, dtype=np.uint32)
        np.copyto(dst, u.view(np.float32), casting="unsafe")
    else:
        np.take(_table(dtype, dst.dtype), src, out=dst)


def fold(a: np.ndarray, sources: list[np.ndarray], weights: list[float], dtype: DType,
         start: bool, s: Scratch) -> None:
    """a += sum of w * source, in order; with `start`, the first source is written into
    `a` instead (the first group's)."""
    for j, (src, w) in enumerate(zip(sources, weights)):
        if start and j == 0:
            widen(a, src, dtype, s)
            if w != 1.0:
                np.multiply(a, w, out=a)
        else:
            c = s.cast[: src.size]
            widen(c, src, dtype, s)
            if w != 1.0:
                np.multiply(c, w, out=c)
            np.add(a, c, out=a)


_HALF_TABLES: dict[str, np.ndarray] = {}


def _half_table(name: str) -> np.ndarray:
    """For each float16 bit pattern x: the FLOAT8 code of x rounded once (`_encode`, exact:
    float16 -> float32 is), plus 256 where x is a rounding boundary of the format (a
    midpoint between two neighbours, or the overflow threshold past the largest value)."""
    if name not in _HALF_TABLES:
        half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        wide = half.astype(np.float32)
        codes = np.empty(1 << 16, np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            _encode(codes, wide, name)
        values = _decode(name)
        finite = np.unique(np.abs(values[np.isfinite(values)]))  # 0 .. the largest, sorted
        bounds = (finite[:-1] + finite[1:]) / 2  # exact: one bit more than the format has
        bounds = np.append(bounds, finite[-1] + (finite[-1] - finite[-2]) / 2)
        boundary = np.isin(np.abs(wide.astype(np.float64)), bounds)
        _HALF_TABLES[name] = codes.astype(np.uint16) | (boundary.astype(np.uint16) << 8)
    return _HALF_TABLES[name]


def _encode_via_half(out: np.ndarray, a: np.ndarray, name: str) -> None:
    """out (codes) = `a` rounded once to nearest even to a FLOAT8 format, as `_encode` of
    it: `a` is rounded to float16 (numpy's cast, to nearest even), whose code is looked up.
    Rounding twice gives the once-rounded code wherever the float16 is not itself a
    rounding boundary of the format (every FLOAT8 value and boundary is a float16, and
    rounding is monotone, so a float16 strictly between two boundaries lies between the
    same two as `a`); the few that are boundaries are rounded once, exactly, by `_encode`.
    About 2 ns a value here, against 5 for round-to-odd and `_encode` on every value."""
    half = a.astype(np.float16)
    coded = _half_table(name)[half.view(np.uint16)]
    np.copyto(out, coded, casting="unsafe")  # the low byte: the code
    if coded.max() >= 256:
        at = np.flatnonzero(coded >= 256)
        exact = np.empty(at.size, np.uint8)
        part = a.reshape(-1)[at]
        _encode(exact, to_odd_float32(part) if part.dtype == np.float64 else part, name)
        out.reshape(-1)[at] = exact


def narrow(out: np.ndarray, a: np.ndarray, dtype: DType, s: Scratch) -> None:
    """out (raw storage of `dtype`) = `a` rounded once to `dtype`."""
    if dtype.name in NATIVE:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by finite()
            np.copyto(out, a, casting="unsafe")
    elif dtype.name == "bfloat16":
        round_bfloat16(out, a, s)
    else:  # one-byte floats: rounded once, to nearest even (_encode_via_half)
        with np.errstate(over="ignore", invalid="ignore"):
            _encode_via_half(out, a, dtype.name)


def to_odd_float32(a: np.ndarray) -> np.ndarray:
    """`a` (float64) rounded to float32 by round-to-odd: truncated, with the last bit set
    where anything was cut. A value rounded so to 24 bits and then to nearest even at a
    precision of 22 bits or less is rounded as if once, from float64 (Boldo and Melquiond,
    "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd",
    2008): float64 -> float8 is this and `_encode` (5 ns a value here, where ml_dtypes'
    float64 cast takes 11 ns and its import 0.56 s), checked against ml_dtypes' cast on
    every float8 format, midpoints and their neighbours included (tests/test_fp8.py)."""
    f = a.astype(np.float32)  # to nearest even
    back = f.astype(np.float64)
    bits = f.view(np.int32)  # sign and magnitude: +1 moves away from zero
    fix = back != a
    fix &= (bits & 1) == 0  # an even result of an inexact rounding: take the odd neighbour
    away = (np.abs(a) > np.abs(back)).astype(np.int32)
    step = away * 2 - 1  # one step away from zero, or towards it
    step *= fix
    bits += step
    return f




_F32_EXP = 0x7F800000


def round_bfloat16(out: np.ndarray, a: np.ndarray, s: Scratch) -> None:
    """out (uint16 bfloat16 patterns) = `a` (float64 or float32) rounded once, to nearest,
    ties to even; overflow gives infinity, NaN the quiet NaN 0x7FC0."""
    n = a.size
    u32 = s.u32[:n]
    if a.dtype == np.float32:
        bits = a.view(np.uint32)
        np.right_shift(bits, 16, out=u32)
        np.bitwise_and(u32, 1, out=u32)
        np.add(u32, 0x7FFF, out=u32)
        np.add(u32, bits, out=u32)
        np.right_shift(u32, 16, out=u32)
        np.copyto(out, u32, casting="unsafe")
        bad = ~np.isfinite(a)
        if bad.any():
            v = a[bad]
            out[bad] = np.where(np.isnan(v), 0x7FC0, np.where(v > 0, 0x7F80, 0xFF80))
        return
    # Round the float64 to bfloat16's 8 significant bits in its own bits (a carry into the
    # exponent is the right answer); the result is exact in float32, whose top 16 bits are
    # then the bfloat16.
    bits, u64 = a.view(np.uint64), s.u64[:n]
    np.right_shift(bits, 45, out=u64)
    np.bitwise_and(u64, 1, out=u64)
    np.add(u64, (1 << 44) - 1, out=u64)
    np.add(u64, bits, out=u64)
    np.bitwise_and(u64, np.uint64(~((1 << 45) - 1) & 0xFFFFFFFFFFFFFFFF), out=u64)
    f32 = u32.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(f32, u64.view(np.float64), casting="unsafe")
    # The float32's exponent field tells the exceptions in one pass (no temporaries): 0 for
    # zero and for values below bfloat16's normal range (2^-126: an exact zero, or a value
    # whose 8-bit rounding above is finer than the subnormal grid), all ones for a NaN, an
    # infinity, or a value that overflowed.
    exp = u64.view(np.uint32)[:n]
    np.bitwise_and(u32, _F32_EXP, out=exp)
    low, high = exp.min(), exp.max()
    np.right_shift(u32, 16, out=u32)
    np.copyto(out, u32, casting="unsafe")
    if low == 0:
        # Subnormal bfloat16s are multiples of 2^-133: round to the nearest one (even).
        tiny = exp == 0
        k = np.rint(a[tiny] * 2.0 ** 133) * 2.0 ** -133
        out[tiny] = k.astype(np.float32).view(np.uint32) >> 16
    if high == _F32_EXP:
        big = exp == _F32_EXP  # a NaN, or an infinity (given, or by overflow: its sign)
        v = a[big]
        out[big] = np.where(np.isnan(v), 0x7FC0, np.where(v > 0, 0x7F80, 0xFF80))


def all_finite(out: np.ndarray, dtype: DType) -> bool:
    """Whether every value of `out` (raw storage of floating `dtype`) is finite."""
    if dtype.name in NATIVE:
        return bool(np.isfinite(out).all())
    if dtype.name == "bfloat16":
        return not bool(((out & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(np.take(_table(dtype, np.dtype(np.float64)), out)).all())


def round_once(a: np.ndarray, dtype: DType, chunk: int = 1 << 16) -> np.ndarray:
    """`a` (float64, any shape) rounded once to `dtype`, as raw storage of that dtype (flat),
    in chunks so the scratch stays small: what the engine writes for a mean `a`."""
    flat = np.ascontiguousarray(a, dtype=np.float64).reshape(-1)
    out = np.empty(flat.size, storage(dtype))
    s = Scratch(min(flat.size, chunk), np.dtype(np.float64))
    for lo in range(0, flat.size, chunk):
        narrow(out[lo:lo + chunk], flat[lo:lo + chunk], dtype, s)
    return out


def as_numpy(t, kind: np.dtype) -> np.ndarray:
    """A read tensor (a view of a mapped file) as a flat numpy array of its raw storage."""
    torch = import_torch()
    flat = t.reshape(-1)
    if flat.dtype in (torch.float64, torch.float32, torch.float16):
        return flat.numpy()
    return flat.view(torch.uint8 if kind.itemsize == 1 else torch.int16).numpy().view(kind)
