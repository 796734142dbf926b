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
  rounded once from the accumulator: rounded to odd at 6 significant bits in the float64's
  own bits, then to nearest even by a table (`encode_float8`): ml_dtypes' float64 cast's
  codes, bit for bit, in a fifth of its time (torch's own goes through float32 to
  nearest, twice rounded).
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


# MXFP4's element format (OCP FP4 e2m1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, the
# sign in bit 3), rounded by the same code as the float8 formats: no infinity or NaN, a
# larger magnitude saturates.
FLOAT4 = {"float4_e2m1fn": (1, 1, 0x07, 0x07, False)}


def _format(name: str) -> tuple:
    return FLOAT8[name] if name in FLOAT8 else FLOAT4[name]


def float8_max(dtype: DType) -> float:
    """The largest finite value of a one-byte float."""
    return float(_table(dtype, np.dtype(np.float64))[FLOAT8[dtype.name][2]])


def _decode(name: str) -> np.ndarray:
    """The value of each of the 256 codes of a FLOAT8 format (float64, exact); of a FLOAT4
    format, codes 0..7 are its magnitudes."""
    m, bias, _, _, fnuz = _format(name)
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


# Each FLOAT8 format's codes that are not finite numbers (NaN, and e5m2's infinities): those
# whose bits under the mask are the value (tests check this against `_decode`).
_SPECIAL = {"float8_e4m3fn": (0x7F, 0x7F), "float8_e5m2": (0x7C, 0x7C),
            "float8_e4m3fnuz": (0xFF, 0x80), "float8_e5m2fnuz": (0xFF, 0x80)}


def float8_unit(name: str) -> float:
    """The power of two `unscaled_float8`'s values are to be multiplied by: 2^(127 - bias)."""
    return 2.0 ** (127 - FLOAT8[name][1])


def unscaled_float8(dst: np.ndarray, codes: np.ndarray, name: str, ints: np.ndarray) -> None:
    """dst (float64) = the values of FLOAT8 `codes` over `float8_unit(name)`, exactly, with
    `ints` (int32, at least codes.size) as scratch: a code's sign, exponent and mantissa
    bits are moved into a float32's (sign to the top, the rest shifted right until the
    exponent's lowest bit is the float32's, the sign spread by the arithmetic shift over the
    float32 exponent's upper bits, then cleared), which makes it that float32 with the exponent bias 127 in place of the
    format's: the value over 2^(127 - bias), subnormal codes included. The codes that are
    not numbers are looked up. 0.65 ns a value here against 1.1 for a 256-entry table
    (`np.take`), and the unit is folded into the scale the caller multiplies by anyway."""
    shift = FLOAT8[name][0] + 1  # the exponent's lowest bit from 24 + mantissa bits to 23
    u = ints[: codes.size]
    np.left_shift(codes.reshape(-1), 24, out=u, dtype=np.int32, casting="unsafe")
    np.right_shift(u, shift, out=u)
    np.bitwise_and(u, np.int32(-(1 << 31) + (1 << (31 - shift)) - 1), out=u)
    flat = dst.reshape(-1)
    np.copyto(flat, u.view(np.float32), casting="unsafe")
    mask, value = _SPECIAL[name]
    special = np.bitwise_and(codes.reshape(-1), mask, out=u.view(np.uint8)[: codes.size])
    if (special == value).any():
        at = np.flatnonzero(special == value)
        flat[at] = _decode(name)[codes.reshape(-1)[at]]  # NaN or infinity: the same over 2^k


def _encode(out: np.ndarray, f: np.ndarray, name: str) -> None:
    """out (codes) = float32 `f` rounded once to nearest even to a FLOAT8 format; a larger
    magnitude than the largest finite one becomes infinity (e5m2) or NaN, NaN stays NaN
    (FLOAT4: the sign is still bit 7 here; `_odd_table` moves it to bit 3)."""
    m, bias, top, over, fnuz = _format(name)
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


_ODD_KEEP = 5  # mantissa bits of the index; round-to-odd there needs 2 more than FLOAT8's 3
_ODD_SHIFT = 52 - _ODD_KEEP
_ODD_MASK = np.uint64((1 << _ODD_SHIFT) - 1)
_ODD_TABLES: dict[tuple[str, bool], np.ndarray] = {}


def _odd_table(name: str, saturate: bool) -> np.ndarray:
    """For each float64 rounded to odd at 6 significant bits (its sign, 11 exponent bits and
    5 mantissa bits, 2^17 of them): its FLOAT8 code, rounded once to nearest even
    (`_encode`; exact, every such value is a float32 or beyond float32's and float8's
    range alike). With `saturate`, a magnitude past the largest finite value (infinity
    included) gives the largest finite code of its sign, as clipping first would."""
    key = (name, saturate)
    if key not in _ODD_TABLES:
        idx = np.arange(1 << (12 + _ODD_KEEP), dtype=np.uint64)
        values = (idx << np.uint64(_ODD_SHIFT)).view(np.float64)
        codes = np.empty(idx.size, np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            _encode(codes, values.astype(np.float32), name)
            if saturate:
                top = _format(name)[2]
                big = np.abs(values) > _decode(name)[top]
                codes[big & (values > 0)] = top
                codes[big & (values < 0)] = top | 0x80
        if name in FLOAT4:  # a nibble: the sign from bit 7 to bit 3
            codes = (codes & 0x07) | ((codes & 0x80) >> 4)
        _ODD_TABLES[key] = codes
    return _ODD_TABLES[key]


def encode_float8(out: np.ndarray, a: np.ndarray, name: str, u64: np.ndarray,
                  saturate: bool = False) -> None:
    """out (codes) = `a` (float64 or float32) rounded once to nearest even to a FLOAT8 format
    (`saturate`: clipped to its largest finite value first), with `u64` (at least a.size)
    as scratch. `a` is rounded to odd at 6 significant bits in its own bits (truncated, the
    last kept bit set where anything was cut), and that value's code is looked up
    (`_odd_table`). Rounding to odd at p bits and then to nearest at q <= p - 2 bits is
    rounding once (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", 2008); FLOAT8 formats have at most 4
    significant bits, and fewer in their subnormal range. Four integer passes and one
    gather: about 2 ns a value here, against 7 for numpy's float16 cast and a table, and
    11 for ml_dtypes' float64 cast, whose codes these are, bit for bit (tests/test_fp8.py)."""
    if a.dtype != np.float64:
        a = a.astype(np.float64)  # exact
    bits = a.reshape(-1).view(np.uint64)
    u = u64[: bits.size]
    np.bitwise_and(bits, _ODD_MASK, out=u)
    np.add(u, _ODD_MASK, out=u)  # bit SHIFT: set where anything below it was (the sticky bit)
    np.bitwise_or(u, bits, out=u)
    np.right_shift(u, np.uint64(_ODD_SHIFT), out=u)
    np.take(_odd_table(name, saturate), u.view(np.int64), out=out.reshape(-1), mode="clip")


def narrow(out: np.ndarray, a: np.ndarray, dtype: DType, s: Scratch) -> None:
    """out (raw storage of `dtype`) = `a` rounded once to `dtype`."""
    if dtype.name in NATIVE:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by finite()
            np.copyto(out, a, casting="unsafe")
    elif dtype.name == "bfloat16":
        round_bfloat16(out, a, s)
    else:  # one-byte floats: rounded once, to nearest even (encode_float8)
        encode_float8(out, a, dtype.name, s.u64)


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
