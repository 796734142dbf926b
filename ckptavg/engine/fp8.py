"""FP8 and MXFP4 weights averaged in what they mean (issue #36), without torch.

MXFP4 (OCP Microscaling, as gpt-oss ships its experts): `X_blocks` holds 32 FP4 e2m1 codes a
row, two a byte (the first value in the low nibble), `X_scales` one e8m0 exponent a row
(2^(byte - 127)). Each input's values are its codes' values times its exponents' powers of
two (exact), averaged in float64 and requantized by the OCP rule (`mx_quantize`): a row's
exponent is floor(log2 of its largest |value|) - 2, each value over it rounded once to the
nearest FP4 value, ties to even, saturated at 6. The output is MXFP4 again (it loads where
the inputs load); `--dtype` is refused (the dequantized weights' layout is the model's).

An FP8 weight is a tensor of float8 codes and a scale: value = code * scale, the scale one
number (per tensor), one per output row (per channel) or one per block of rows x columns
(DeepSeek-V3's 128 x 128 `weight_scale_inv`, which is multiplied too). Averaging the codes
and the scales apart gives a wrong model, so each input's weight is dequantized with its
own scale, the values are averaged in float64, and the mean is then

- requantized in the inputs' scheme (the default): each new scale is the largest |value|
  of its tensor, row or block over the float8 type's largest finite value (448 for
  e4m3fn), at least float32's epsilon (compressed-tensors' rule; DeepSeek's without the
  floor), rounded to the scale's own dtype; each code is value / scale saturated to the
  type's range and rounded once to nearest even (`arith.encode_float8`); or
- written in the output dtype (`--dtype bfloat16|float32`), the scales left out.

Activation scales (`input_scale`, `k_scale`, `v_scale`, ...) are statistics of the inputs'
activations, not weights: the output keeps the largest of the inputs' values, so that no
activation saturates more than it did in any input (with `--dtype` they are left out with
the weight scales). The average's metadata says so (`average.quantized`).

Memory stays a slice: a weight is processed a few rows at a time (whole blocks of rows for
block scales) in a float64 buffer of about SLICE values, and row and block scales are made
as their rows pass (the plan writes each scale right after its weight); a per-tensor scale
needs the largest value of the whole mean, so such a weight is averaged twice (once for the
scale, once for the codes): its codes are one byte, so that costs what one read of a
bfloat16 copy does. Scales multiply and divide by broadcasting.
"""

from __future__ import annotations

import threading

import numpy as np

from ckptavg.engine import arith
from ckptavg.engine.nonfinite import raise_nonfinite
from ckptavg.io.files import pread_extent
from ckptavg.io.quantized import MX_BLOCK, Fp8Layout, Fp8Pair

SLICE = 1 << 20  # values of a weight averaged at a time (8 MiB of float64)
EPS = float(np.finfo(np.float32).eps)  # the smallest scale written (compressed-tensors')


class Fp8Run:
    """The FP8 part of one average: `write(spec, bg)` writes a pair's weight (requantized
    codes, or values in the output dtype), a pair's new scale, or an activation scale."""

    def __init__(self, plan, layout: Fp8Layout, requantize: bool, hashes=None,
                 threads: int = 1):
        self.plan, self.layout, self.requantize = plan, layout, requantize
        self.threads = threads
        self.readers, self.weights = plan.readers, plan.weights
        self.hashes = hashes
        self.scales_of = layout.scales  # scale key -> weight key
        self._new: dict[str, np.ndarray] = {}  # weight key -> its new scale (float64)
        self._input_scales: dict[str, list[np.ndarray]] = {}
        self._unit_scales: dict[str, list[np.ndarray]] = {}
        self._local = threading.local()  # each thread's slice buffers, reused

    def _buffer(self, name: str, n: int, dtype=np.float64) -> np.ndarray:
        """A buffer of `n` values (float64 unless said) of this thread's, kept from slice to
        slice (fresh pages for every slice cost page faults: a third of the widening's time)."""
        buf = getattr(self._local, name, None)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, SLICE), dtype)
            setattr(self._local, name, buf)
        return buf[:n]

    def _bits(self, n: int) -> np.ndarray:
        """This thread's uint64 scratch of `n` values for the float8 rounding: the buffer
        `_mean` widens inputs into and the |mean| is taken into, free again by then."""
        return self._buffer("value", n).view(np.uint64)

    def handles(self, key: str) -> bool:
        return key in self.layout.pairs or key in self.scales_of or \
            key in self.layout.activations

    def write(self, spec, bg, streams: bool) -> int:
        """Write tensor `spec.key`; returns the bytes read for it."""
        key = spec.key
        if key in self.layout.pairs:
            pair = self.layout.pairs[key]
            if pair.kind == "mx":
                return self._mx_weight(pair, bg, streams)
            return self._weight(pair, spec, bg, streams)
        if key in self.scales_of and self.layout.pairs[self.scales_of[key]].kind == "mx":
            bg.write(key, self._mx_scales(self.layout.pairs[self.scales_of[key]]))
            return self.readers[0].info(key).nbytes * len(self.readers)
        raws = [self._raw(i, key) for i in range(len(self.readers))]
        self._hash(key, raws)
        if key in self.scales_of:
            pair = self.layout.pairs[self.scales_of[key]]
            bg.write(key, arith.round_once(self.new_scale(pair), spec.dtype).view(np.uint8))
        else:  # an activation scale: the largest of the inputs'
            values = [self._values(key, raw) for raw in raws]
            bg.write(key, arith.round_once(np.maximum.reduce(values), spec.dtype)
                     .view(np.uint8))
        return sum(r.nbytes for r in raws)

    # ------------------------------------------------------------------ one weight

    def _weight(self, pair: Fp8Pair, spec, bg, streams: bool) -> int:
        shape = self.readers[0].info(pair.weight).shape
        rows, cols = _matrix(shape)
        step = _rows_per_slice(rows, cols, pair)
        scale_dtype = self.readers[0].info(pair.scale).dtype
        top = arith.float8_max(self.readers[0].info(pair.weight).dtype)
        # a per-tensor scale needs the whole mean first (a pass of its own); row and block
        # scales are made slice by slice, each slice holding whole rows or blocks of rows
        known = self.requantize and (pair.kind == "tensor" or pair.weight in self._new)
        grid = _stored(self.new_scale(pair), scale_dtype).reshape(
            _scale_grid(pair, rows, cols)) if known else None
        if self.requantize and grid is None:
            amax = np.zeros(_scale_grid(pair, rows, cols), np.float64)
        out = None if streams else np.empty(self.readers[0].info(pair.weight).nbytes, np.uint8)
        for i in range(len(self.readers)):
            self._input_scale(i, pair)  # read before the slices run on threads

        def one(r0: int, r1: int) -> tuple[np.ndarray, list[np.ndarray]]:
            mean, codes = self._mean(pair, r0, r1, cols)
            if not self.requantize:
                return arith.round_once(mean, spec.dtype).view(np.uint8), codes
            here = grid
            if here is None:  # this slice's rows or blocks of rows: its own scales
                _fold_amax(amax, np.abs(mean, out=self._buffer("value", mean.size)), pair,
                           r0, r1, cols)
                here = _stored(_scale_rule(amax, top), scale_dtype)
            _apply(mean, here, pair, r0, r1, cols, np.divide)
            coded = np.empty(mean.size, np.uint8)  # clipped to +-top and rounded once
            arith.encode_float8(coded, mean, spec.dtype.name, self._bits(mean.size),
                                saturate=True)
            return coded, codes

        bounds = [(r0, min(rows, r0 + step)) for r0 in range(0, max(rows, 1), step)]
        located = all(r.locate(pair.weight) is not None for r in self.readers)
        for (r0, r1), (raw, codes) in zip(bounds, self._run(one, bounds, located)):
            if self.hashes is not None:  # in order, in this thread
                for i, c in enumerate(codes):
                    self.hashes.update(i, pair.weight, c)
            if streams:
                bg.write(pair.weight, raw, part=(r0 == 0, r1 >= rows))
            else:
                out[r0 * cols:r1 * cols] = raw
        if self.requantize and not known:
            self._new[pair.weight] = _scale_rule(amax, top).reshape(
                self.readers[0].info(pair.scale).shape)
        if not streams:
            bg.write(pair.weight, out)
        if self.hashes is not None:
            for i in range(len(self.readers)):
                self.hashes.done(i, pair.weight)
        for r in self.readers:
            r.release(pair.weight)
        return self.readers[0].info(pair.weight).nbytes * len(self.readers)

    # ------------------------------------------------------------------ MXFP4

    def _mx_weight(self, pair: Fp8Pair, bg, streams: bool) -> int:
        """An MXFP4 weight: each block of 32 values dequantized with its input's exponent,
        averaged in float64 and requantized by the OCP rule (`_mx_slice`), its codes
        written slice by slice and its new exponents kept for its scale, which the plan
        writes next. Each input's blocks and exponents go to its content hashes here."""
        info = self.readers[0].info(pair.weight)
        rows, half = int(np.prod(info.shape[:-1])), MX_BLOCK // 2
        step = max(1, SLICE // MX_BLOCK)
        exps = np.empty(rows, np.uint8)
        out = None if streams else np.empty(info.nbytes, np.uint8)
        bounds = [(r0, min(rows, r0 + step)) for r0 in range(0, max(rows, 1), step)]
        located = all(r.locate(pair.weight) is not None for r in self.readers)
        for (r0, r1), (packed, new, read) in zip(bounds, self._run(
                lambda a, b: self._mx_slice(pair, a, b), bounds, located)):
            exps[r0:r1] = new
            self._mx_hash(pair, read)
            if streams:
                bg.write(pair.weight, packed, part=(r0 == 0, r1 >= rows))
            else:
                out[r0 * half:r1 * half] = packed
        if not streams:
            bg.write(pair.weight, out)
        self._new[pair.weight] = exps
        self._mx_done(pair)
        return info.nbytes * len(self.readers)

    def _mx_scales(self, pair: Fp8Pair) -> np.ndarray:
        """The new exponents of an MXFP4 weight: kept from its pass, or (a torchrun rank
        that writes the scales and not the blocks) from a pass of their own."""
        if pair.weight in self._new:
            return self._new.pop(pair.weight)
        rows = int(np.prod(self.readers[0].info(pair.scale).shape))
        step = max(1, SLICE // MX_BLOCK)
        exps = np.empty(rows, np.uint8)
        for r0 in range(0, max(rows, 1), step):
            r1 = min(rows, r0 + step)
            _, exps[r0:r1], read = self._mx_slice(pair, r0, r1)
            self._mx_hash(pair, read, blocks=False)
        self._mx_done(pair, blocks=False)
        return exps

    def _mx_slice(self, pair: Fp8Pair, r0: int,
                  r1: int) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, ...]]]:
        """Blocks [r0, r1) of an MXFP4 weight: (its new codes, packed two a byte; its new
        e8m0 exponents; each input's codes and exponents as read)."""
        n, half = r1 - r0, MX_BLOCK // 2
        acc = self._buffer("acc", n * MX_BLOCK)[: n * MX_BLOCK].reshape(n, MX_BLOCK)
        value = self._buffer("value", n * MX_BLOCK)[: n * MX_BLOCK].reshape(n, MX_BLOCK)
        read = []
        for i in range(len(self.readers)):
            codes = self._codes(i, pair.weight, r0 * half, n * half).reshape(n, half)
            exp = self._codes(i, pair.scale, r0, n)
            read.append((codes, exp))
            into = acc if i == 0 else value
            # each byte's two values (the low nibble first), then times 2^(exp - 127): exact
            np.take(FP4_PAIRS, codes.reshape(-1), axis=0, out=into.reshape(-1, 2),
                    mode="clip")
            np.multiply(into, np.ldexp(1.0, exp.astype(np.int32) - 127)[:, None], out=into)
            if (exp == 0xFF).any():
                into[exp == 0xFF] = np.nan  # e8m0's NaN
            if self.weights[i] != 1.0:
                np.multiply(into, self.weights[i], out=into)
            if i:
                np.add(acc, into, out=acc)
        np.divide(acc, self.plan.total_weight, out=acc)
        if not np.isfinite(acc).all() and not self.plan.allow_nonfinite:
            raise_nonfinite(self.readers, pair.weight, self.readers[0].info(pair.weight).dtype)
        packed, exps = mx_quantize(acc, value.reshape(-1).view(np.uint64))
        return packed, exps, read

    def _mx_hash(self, pair: Fp8Pair, read, blocks: bool = True) -> None:
        if self.hashes is not None:
            for i, (codes, exp) in enumerate(read):
                if blocks:
                    self.hashes.update(i, pair.weight, codes)
                self.hashes.update(i, pair.scale, exp)

    def _mx_done(self, pair: Fp8Pair, blocks: bool = True) -> None:
        """The pair's content hashes complete (the blocks' too where they were written
        here), and both tensors released: a pass for the scales alone read the blocks too."""
        if self.hashes is not None:
            for i in range(len(self.readers)):
                for k in (pair.weight, pair.scale) if blocks else (pair.scale,):
                    self.hashes.done(i, k)
        for r in self.readers:
            r.release(pair.weight)
            r.release(pair.scale)

    def _run(self, fn, bounds: list[tuple[int, int]], parallel: bool):
        """fn(r0, r1) over the slices, in order: on `threads` threads (numpy lets go of the
        GIL) with a few slices in flight, where every input is read with pread."""
        if self.threads < 2 or not parallel or len(bounds) < 2:
            for r0, r1 in bounds:
                yield fn(r0, r1)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="ckptavg-fp8") as pool:
            pending = deque()
            try:
                for r0, r1 in bounds:
                    pending.append(pool.submit(fn, r0, r1))
                    if len(pending) > self.threads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def new_scale(self, pair: Fp8Pair) -> np.ndarray:
        """The new scale of `pair` (float64, the scale's shape): the largest |value| of the
        mean over each scale's tensor, row or block, over the float8 type's largest value."""
        if pair.weight in self._new:
            return self._new[pair.weight]
        info = self.readers[0].info(pair.weight)
        rows, cols = _matrix(info.shape)
        amax = np.zeros(self.readers[0].info(pair.scale).shape or (1,), np.float64).reshape(
            _scale_grid(pair, rows, cols))
        step = _rows_per_slice(rows, cols, pair)
        for r0 in range(0, max(rows, 1), step):
            r1 = min(rows, r0 + step)
            mean = self._mean(pair, r0, r1, cols)[0]
            mean = np.abs(mean, out=self._buffer("value", mean.size))
            _fold_amax(amax, mean, pair, r0, r1, cols)
        scale = _scale_rule(amax, arith.float8_max(info.dtype))
        self._new[pair.weight] = scale.reshape(self.readers[0].info(pair.scale).shape)
        return self._new[pair.weight]

    def _mean(self, pair: Fp8Pair, r0: int, r1: int,
              cols: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The weighted mean of the inputs' dequantized rows [r0, r1) (flat float64), and
        each input's codes of those rows (for its content hash)."""
        info = self.readers[0].info(pair.weight)
        n = (r1 - r0) * cols
        acc, read = self._buffer("acc", n), []
        ints = self._buffer("ints", n, np.int32)
        for i in range(len(self.readers)):
            codes = self._codes(i, pair.weight, r0 * cols, n)
            read.append(codes)
            into = acc if i == 0 else self._buffer("value", n)
            # exact: the codes' values over a power of two, times the input's scale times
            # that power (exact), so each product is value * scale rounded once
            arith.unscaled_float8(into, codes, info.dtype.name, ints)
            _apply(into, self._unit_scale(i, pair), pair, r0, r1, cols, np.multiply)
            w = self.weights[i]
            if w != 1.0:
                np.multiply(into, w, out=into)
            if i:
                np.add(acc, into, out=acc)
        np.divide(acc, self.plan.total_weight, out=acc)
        if not np.isfinite(acc).all() and not self.plan.allow_nonfinite:
            raise_nonfinite(self.readers, pair.weight, info.dtype)
        return acc, read

    def _unit_scale(self, i: int, pair: Fp8Pair) -> np.ndarray:
        """Input i's scale of `pair` times `arith.float8_unit` of the weight's format (exact:
        a power of two), what `arith.unscaled_float8`'s values are multiplied by."""
        kept = self._unit_scales.setdefault(pair.weight, [None] * len(self.readers))
        if kept[i] is None:
            unit = arith.float8_unit(self.readers[0].info(pair.weight).dtype.name)
            kept[i] = self._input_scale(i, pair) * unit
        return kept[i]

    def _input_scale(self, i: int, pair: Fp8Pair) -> np.ndarray:
        kept = self._input_scales.setdefault(pair.weight, [None] * len(self.readers))
        if kept[i] is None:
            kept[i] = self._values(pair.scale, self._raw(i, pair.scale))
        return kept[i]

    # ------------------------------------------------------------------ reading

    def _codes(self, i: int, key: str, start: int, n: int) -> np.ndarray:
        """n bytes (codes) of input i's tensor `key` from element `start`."""
        reader = self.readers[i]
        ext = reader.locate(key)
        if ext is not None:
            buf = np.empty(n, np.uint8)
            pread_extent(ext, memoryview(buf), start)
            return buf
        flat = arith.as_numpy(reader.read(key), np.dtype(np.uint8))
        return np.array(flat[start:start + n])

    def _raw(self, i: int, key: str) -> np.ndarray:
        from ckptavg.engine.kernel import read_copy
        from ckptavg.io.writer import as_array

        return as_array(read_copy(self.readers[i], key)).reshape(-1).view(np.uint8)

    def _values(self, key: str, raw: np.ndarray) -> np.ndarray:
        """A small floating tensor's values (float64, its shape) from its raw bytes."""
        info = self.readers[0].info(key)
        flat = raw.view(arith.storage(info.dtype))
        out = np.empty(flat.size, np.float64)
        arith.widen(out, flat, info.dtype, arith.Scratch(flat.size, np.dtype(np.float64)))
        return out.reshape(info.shape)

    def _hash(self, key: str, raws: list[np.ndarray]) -> None:
        if self.hashes is not None:
            for i, raw in enumerate(raws):
                self.hashes.update(i, key, raw)
                self.hashes.done(i, key)

    def feed_dropped(self, keys) -> None:
        """With --dtype, the scales are not written but are the inputs' tensors all the
        same: their bytes go to the content hashes."""
        for key in keys:
            self._hash(key, [self._raw(i, key) for i in range(len(self.readers))])


# ---------------------------------------------------------------------- the arithmetic

# MXFP4 (OCP Microscaling Formats v1.0): FP4 e2m1 codes (sign bit 3), 32 to a block whose
# scale is an e8m0 exponent (2^(byte - 127), 255 NaN).
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_PAIRS = np.stack([FP4[np.arange(256) & 0x0F], FP4[np.arange(256) >> 4]], axis=1)
FP4_EMAX = 2  # the largest FP4 value is 1.5 x 2^2


def mx_quantize(values: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 codes of `values` (float64, one block of 32 a row; overwritten), by the OCP
    rule: a block's exponent is floor(log2(its largest |value|)) - 2 (FP4's largest
    exponent), held to e8m0's range [-127, 127] (-127 for a block of zeros; NaN, 255, for a
    block that is not finite); each value over 2^exponent (exact) is rounded once to the
    nearest FP4 value, ties to the even code, larger magnitudes to 6 (`arith.encode_float8`
    with FP4's table). Returns (codes packed two a byte, the first value in the low nibble;
    the exponents as e8m0 bytes). `bits`: uint64 scratch of values' size."""
    amax = np.abs(values).max(axis=1)
    finite = np.isfinite(amax)
    exp = np.frexp(np.where(finite, amax, 1.0))[1].astype(np.int32) - 1 - FP4_EMAX
    exp[amax == 0] = -127
    np.clip(exp, -127, 127, out=exp)
    np.multiply(values, np.ldexp(1.0, -exp)[:, None], out=values)  # exact: a power of two
    codes = np.empty(values.size, np.uint8)
    arith.encode_float8(codes, values, "float4_e2m1fn", bits, saturate=True)
    pairs = codes.reshape(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)
    exps = (exp + 127).astype(np.uint8)
    exps[~finite] = 0xFF
    return packed, exps


def _matrix(shape) -> tuple[int, int]:
    """(rows, columns) a weight is handled as: a matrix as it is, anything else as one row."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    n = int(np.prod(shape)) if len(shape) else 1
    return (1, n)


def _rows_per_slice(rows: int, cols: int, pair: Fp8Pair) -> int:
    """Rows averaged at a time: about SLICE values, whole blocks of rows for block scales."""
    step = max(1, SLICE // max(cols, 1))
    if pair.kind == "block":
        b = pair.block[0]
        step = max(b, step // b * b)
    return min(step, max(rows, 1))


def _scale_grid(pair: Fp8Pair, rows: int, cols: int) -> tuple[int, int]:
    if pair.kind == "tensor":
        return (1, 1)
    if pair.kind == "channel":
        return (rows, 1)
    return (-(-rows // pair.block[0]), -(-cols // pair.block[1]))


def _apply(values: np.ndarray, scale: np.ndarray, pair: Fp8Pair, r0: int, r1: int, cols: int,
           op) -> None:
    """values (rows r0..r1 of the weight, flat) = op(values, each value's scale), in place,
    by broadcasting (a block row's scales are repeated into one row of columns, no
    scale-sized copy): op is np.multiply (dequantize) or np.divide (quantize)."""
    if pair.kind == "tensor":
        op(values, float(scale.reshape(-1)[0]), out=values)
        return
    m = values.reshape(r1 - r0, cols)
    if pair.kind == "channel":
        op(m, scale.reshape(-1)[r0:r1, None], out=m)
        return
    b0, b1 = pair.block
    grid = scale.reshape(-(-scale.size // scale.shape[-1]) if scale.ndim else 1, -1)
    for g in range(r0 // b0, -(-r1 // b0)):  # each block row of the slice: its row of
        lo, hi = max(r0, g * b0) - r0, min(r1, (g + 1) * b0) - r0  # scales, each repeated
        row = np.repeat(grid[g], b1)[:cols]  # over its block's columns (a contiguous row
        op(m[lo:hi], row[None, :], out=m[lo:hi])  # broadcast: 0.55 ns a value, 0.8 by blocks)


def _fold_amax(amax: np.ndarray, mean: np.ndarray, pair: Fp8Pair, r0: int, r1: int,
               cols: int) -> None:
    """amax (the scale grid) = max(amax, the largest |value| of each group in rows r0..r1)."""
    if mean.size == 0:
        return
    if pair.kind == "tensor":
        amax[0, 0] = max(amax[0, 0], float(mean.max()))
        return
    m = mean.reshape(r1 - r0, cols)
    if pair.kind == "channel":
        np.maximum(amax[r0:r1, 0], m.max(axis=1), out=amax[r0:r1, 0])
        return
    b0, b1 = pair.block
    g0 = r0 // b0
    nb = -(-(r1 - r0) // b0)
    pad_r, pad_c = nb * b0 - (r1 - r0), -(-cols // b1) * b1 - cols
    if pad_r or pad_c:
        m = np.pad(m, ((0, pad_r), (0, pad_c)))
    blocks = m.reshape(nb, b0, -1, b1).max(axis=(1, 3))
    np.maximum(amax[g0:g0 + nb], blocks, out=amax[g0:g0 + nb])


def _scale_rule(amax: np.ndarray, top: float) -> np.ndarray:
    """The scheme's scale of each group from its largest |value|: amax over the float8
    type's largest finite value, at least float32's epsilon (compressed-tensors' floor)."""
    return np.maximum(amax / top, EPS)


def _stored(scale: np.ndarray, dtype) -> np.ndarray:
    """The scale as its file will hold it (rounded once to its dtype), as float64: the codes
    are computed against this value, so that code * stored scale is what was meant."""
    raw = arith.round_once(scale, dtype)
    out = np.empty(raw.size, np.float64)
    arith.widen(out, raw, dtype, arith.Scratch(raw.size, np.dtype(np.float64)))
    return out.reshape(scale.shape)


