"""The kernel: the tensor-major loop that reduces every input into the output.

`execute(plan, writer, keys)` walks tensor by tensor over any subset of keys: for each key
the tensor is read from every input in turn and folded into one float64 (or float32)
accumulator, chunk by chunk, so peak memory is a few tensors: never the model, never the
number of inputs. Integer and bool tensors are not averaged: the newest input's value is
kept. The arithmetic is numpy's (arith.py); reads are pread into staging buffers one block
ahead; a writer thread copies each result to the file while the next is computed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ckptavg import options
from ckptavg.engine import arith
from ckptavg.engine.content import ContentHashes
from ckptavg.engine.nonfinite import raise_nonfinite
from ckptavg.engine.plan import Plan
from ckptavg.io import ReaderBase, TensorSpec, dtypes
from ckptavg.io.dtypes import DType
from ckptavg.io.files import pread_extent
from ckptavg.io.writer import BackgroundWriter, Writer
from ckptavg.results import Progress


def execute(plan: Plan, writer: Writer, keys: Sequence[str] | None = None,
            progress: Progress | None = None, threads: int | None = options.AVERAGE_THREADS,
            hashes: ContentHashes | None = None) -> None:
    """The tensor-major loop over `keys` (default: all, in plan order) into `writer`.

    Each tensor is reduced chunk by chunk (`_reduce`) into an output buffer; a writer thread
    copies it to the file while the next tensor is reduced into the other of two buffers.
    Inputs are read with pread by a reader thread one block ahead (or, where a reader cannot
    locate a tensor in a file, as views of the mapped file). Scratch memory: cache-sized
    chunks, two staging blocks per input read at once, and two output buffers of the largest
    tensor or slice, whatever N is. The arithmetic (numpy, see arith.py) runs on `threads`
    threads, each on its own share of every block (default: the cores idle when it starts,
    less the one the reader thread keeps busy; see idle_cores).

    With `hashes` (engine/content.py), each input's bytes are fed to its content hash as
    they are read (integer tensors of every input are read for it too), or a whole torch
    zip record gives its checked CRC-32, so the hashes cost no second read."""
    n = threads or max(1, idle_cores() - 1)
    pool = ThreadPoolExecutor(n - 1, thread_name_prefix="ckptavg-sum") if n > 1 else None
    try:
        _execute(plan, writer, keys, progress, Workers(n, pool), hashes)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def idle_cores() -> int:
    """Cores no other runnable task is using right now (/proc/loadavg's running count, which
    includes this process), at least 1. Threads that wait for each other at every step made
    a 2-core machine that ran one other busy process 3x slower (torch's threads, measured
    before the engine moved to numpy), while on an idle machine 2 threads were 1.2x faster."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 1
    return max(1, min(cores, cores - (running - 1)))


class Workers:
    """`count` arithmetic threads (the caller's and count - 1 of `pool`): `run(fn, n)` calls
    fn(scratch, lo, hi) over [0, n) in CHUNK-aligned shares, one per thread, and waits."""

    def __init__(self, count: int, pool: ThreadPoolExecutor | None):
        self.count, self.pool = count, pool
        self.scratch: list[arith.Scratch] = []

    def prepare(self, n: int, acc: np.dtype) -> None:
        self.scratch = [arith.Scratch(n, acc) for _ in range(self.count)]

    def run(self, fn: Callable, n: int) -> None:
        chunks = -(-n // CHUNK)
        share = -(-chunks // self.count) * CHUNK
        parts = [(lo, min(lo + share, n)) for lo in range(0, n, share)] if n else []
        if self.pool is None or len(parts) < 2:
            for lo, hi in parts:
                fn(self.scratch[0], lo, hi)
            return
        futures = [self.pool.submit(fn, self.scratch[i + 1], lo, hi)
                   for i, (lo, hi) in enumerate(parts[1:])]
        try:
            fn(self.scratch[0], *parts[0])
        finally:
            for f in futures:
                _settle(f)
        for f in futures:
            f.result()


def _execute(plan: Plan, writer: Writer, keys: Sequence[str] | None,
             progress: Progress | None, workers: Workers,
             hashes: ContentHashes | None = None) -> None:
    readers, ref = plan.readers, plan.readers[0]
    wanted = set(keys) if keys is not None else None
    specs = [s for s in plan.specs if wanted is None or s.key in wanted]
    fp8 = None
    if plan.fp8 is not None:  # FP8 weights, their scales: averaged in value space (engine/fp8.py)
        from ckptavg.engine.fp8 import Fp8Run

        # its reads are in its own threads: the core the reader thread would keep busy too
        fp8 = Fp8Run(plan, plan.fp8, not plan.dequantize, hashes, workers.count + 1)
        if plan.dequantize and wanted is None:
            written = {s.key for s in plan.specs}
            fp8.feed_dropped([k for k in ref.keys() if k not in written])
    floats = [s for s in specs if ref.info(s.key).dtype.is_floating_point
              and (fp8 is None or not fp8.handles(s.key))]
    max_numel = max((s.numel for s in floats), default=0)
    wide = plan.accumulate == "float64" or any(ref.info(s.key).dtype == dtypes.float64
                                               for s in floats)
    acc = np.dtype(np.float64 if wide else np.float32)
    # A writer that streams can take a large tensor in slices: then the output buffers (and
    # the float64 accumulator of more than GROUP inputs) are a slice, not the largest tensor.
    streams = writer.streams_parts

    def slice_of(spec: TensorSpec) -> int:
        return min(spec.numel, _slice_elems(spec.dtype)) if streams else spec.numel

    workers.prepare(min(max_numel, CHUNK), acc)
    widest = max((ref.info(s.key).dtype.itemsize for s in floats), default=1)
    stage = Stage(min(len(readers), GROUP), widest) if floats else None
    most = max((slice_of(s) for s in floats), default=0)
    full = np.empty(most, acc) if len(readers) > GROUP else None
    out_bytes = max((slice_of(s) * s.dtype.itemsize for s in floats), default=0)
    # Two output buffers: the writer thread copies one to the file while the next tensor (or
    # slice) is computed into the other.
    bg = BackgroundWriter(writer, [np.empty(out_bytes, np.uint8) for _ in range(2)])
    total_bytes, done = plan.bytes_in, 0
    try:
        for spec in specs:
            if writer.shares_ties and spec.key in plan.ties:
                if hashes is not None:
                    hashes.tie(spec.key, plan.ties[spec.key])
                continue  # torch and DCP writers point tied names at one tensor
            info = ref.info(spec.key)
            if fp8 is not None and fp8.handles(spec.key):
                done += fp8.write(spec, bg, streams)
                if progress:
                    progress(done, total_bytes)
                continue
            if not info.dtype.is_floating_point:
                done += _keep_newest(readers, spec.key, bg, hashes)
                if progress:
                    progress(done, total_bytes)
                continue
            step = slice_of(spec)
            kind = arith.storage(spec.dtype)
            for lo in range(0, max(spec.numel, 1), max(step, 1)):
                n = min(step, spec.numel - lo)
                buf = bg.buffer()
                out = buf[: n * spec.dtype.itemsize].view(kind)
                finite = _reduce(plan, spec.key, spec.dtype, out, workers,
                                 None if full is None else full[:n], lo, stage, hashes)
                done += n * info.dtype.itemsize * len(readers)
                if progress:
                    progress(done, total_bytes)
                if not finite and not plan.allow_nonfinite:
                    raise_nonfinite(readers, spec.key, spec.dtype)
                whole = n == spec.numel
                bg.write(spec.key, out, buf, part=None if whole else (lo == 0, lo + n == spec.numel))
            if hashes is not None:
                for i in range(len(readers)):
                    hashes.done(i, spec.key)
        bg.finish()
    finally:
        bg.stop()
        if stage is not None:
            stage.close()


def _keep_newest(readers: list, key: str, bg: BackgroundWriter,
                 hashes: ContentHashes | None) -> int:
    """An integer or bool tensor is not averaged: the newest input's value is written (its
    bytes hashed for every input's content hash). Returns the bytes it counts as read."""
    value = read_copy(readers[-1], key)
    if hashes is not None:
        _hash_whole(hashes, readers, key, value)
    bg.write(key, value)
    return readers[0].info(key).nbytes


CHUNK = 1 << 16  # elements per step: a float64 accumulator of 512 KiB stays in L2 cache


SLICE = 64 << 20  # output bytes computed and written at a time: a larger tensor goes in slices


def _slice_elems(dtype: DType) -> int:
    return max(CHUNK, SLICE // dtype.itemsize // CHUNK * CHUNK)


RESIDENT = 64 << 20  # bytes of mapped input pages kept between releases, over a group


GROUP = 32  # inputs read at once; more are summed group by group (memory flat in N)


FAULT_AROUND = 64 << 10  # the kernel maps up to this much around a page fault (its default)


def _feeder(hashes: ContentHashes, i: int, key: str, ext, nbytes: int) -> Callable | None:
    """What takes input `i`'s bytes of `key` for its content hash: nothing when the tensor is
    a whole zip record, whose checked CRC-32 is its digest (ContentHashes.adopt)."""
    check = ext.check
    if check is not None and check.offset == ext.offset and check.size == nbytes:
        hashes.adopt(i, key, check.expected)
        return None
    return lambda data: hashes.update(i, key, data)


def _hash_whole(hashes: ContentHashes, readers: list[ReaderBase], key: str, last) -> None:
    """Feed a tensor the kernel copies from the newest input (integers) to every input's
    content hash: the newest input's copy, the others read for it."""
    from ckptavg.io.writer import as_array

    for i, r in enumerate(readers):
        hashes.update(i, key, as_array(last if r is readers[-1] else read_copy(r, key)))
        hashes.done(i, key)


def _reduce(plan: Plan, key: str, out_dtype: DType, out: np.ndarray, workers: Workers,
            full: np.ndarray | None, base: int = 0, stage: Stage | None = None,
            hashes: ContentHashes | None = None) -> bool:
    """out = sum(w_i * input_i[key][base:base + out.size]) / sum(w), rounded once to
    `out_dtype`, chunk by chunk: each chunk of the accumulator stays in cache while the
    inputs stream through it, instead of N passes over a tensor-sized accumulator in memory.
    Returns whether every value of `out` is finite.

    At most GROUP inputs are read at once: with more, the groups are summed one after the
    other into a tensor-sized accumulator (`full`), so the input pages mapped at any time,
    and so memory, do not grow with N. Inputs that can be located in a file
    (`ReaderBase.locate`) are read block by block with pread into the `stage` buffers; the
    others through their mapping, whose pages are released as they are done."""
    readers, weights = plan.readers, plan.weights
    numel = out.size
    if numel == 0:
        return True  # nothing to read (a torch file would be loaded by torch to read it)
    dtype = readers[0].info(key).dtype
    kind = arith.storage(dtype)
    finite = [True]

    def finish_chunk(s: arith.Scratch, a: np.ndarray, o: np.ndarray) -> None:
        """o = a / sum(w), rounded once to the output dtype; a non-finite value is noted."""
        np.divide(a, plan.total_weight, out=a)
        arith.narrow(o, a, out_dtype, s)
        if not arith.all_finite(o, out_dtype):
            finite[0] = False

    def chunks(sources: Callable[[int, int], list[np.ndarray]], members: range, first: bool,
               finish: bool, start: int = 0) -> Callable:
        """The work on elements [lo, hi) of the current block (that begins at `start`)."""
        ws = [weights[i] for i in members]

        def work(s: arith.Scratch, lo: int, hi: int) -> None:
            for off in range(lo, hi, CHUNK):
                n = min(CHUNK, hi - off)
                a = full[start + off:start + off + n] if full is not None else s.acc[:n]
                arith.fold(a, sources(off, n), ws, dtype, first, s)
                if finish:
                    finish_chunk(s, a, out[start + off:start + off + n])

        return work

    groups = [range(i, min(i + GROUP, len(readers))) for i in range(0, len(readers), GROUP)]
    finish = full is None  # else the groups sum into `full`, divided and rounded at the end
    for g, members in enumerate(groups):
        extents = [readers[i].locate(key) for i in members]
        if stage is not None and all(extents):
            feed = None if hashes is None else [
                _feeder(hashes, i, key, ext, readers[0].info(key).nbytes)
                for i, ext in zip(members, extents)]
            _reduce_read(key, kind, numel, base, extents, stage, workers,
                         lambda srcs, start, first=g == 0, m=members: chunks(
                             srcs, m, first, finish, start), feed)
            continue
        _reduce_mapped(key, kind, numel, base, readers, members, workers,
                       lambda srcs, start, first=g == 0, m=members: chunks(
                           srcs, m, first, finish, start), hashes)
    if full is not None:
        def finish_full(s: arith.Scratch, lo: int, hi: int) -> None:
            for off in range(lo, hi, CHUNK):
                end = min(off + CHUNK, hi)
                finish_chunk(s, full[off:end], out[off:end])

        workers.run(finish_full, numel)
    return finite[0]


def _reduce_mapped(key: str, kind: np.dtype, numel: int, base: int, readers: list,
                   members: range, workers: Workers, make: Callable,
                   hashes: ContentHashes | None) -> None:
    """One group of `_reduce` through the inputs' mappings (inputs that cannot be located
    in a file): elements [base, base + numel) of inputs `members`, a stretch at a time;
    `make(sources, start)` gives the work on one stretch (see `_reduce`)."""
    flats = [arith.as_numpy(readers[i].read(key), kind)[base:base + numel] for i in members]
    # Release each input's pages often enough that the inputs read together keep at most
    # RESIDENT bytes mapped in.
    release_every = max(CHUNK, RESIDENT // (len(members) * kind.itemsize) // CHUNK * CHUNK)
    for lo in range(0, numel, release_every):
        n = min(release_every, numel - lo)
        if hashes is not None:
            for i, f in zip(members, flats):
                hashes.update(i, key, f[lo:lo + n])
        workers.run(make(lambda off, k, lo=lo: [f[lo + off:lo + off + k] for f in flats], lo), n)
        # Reach back: faults map pages around them, also some released before.
        start = (base + lo) * kind.itemsize - FAULT_AROUND
        for i in members:
            readers[i].release_range(key, start, (base + lo + n) * kind.itemsize - start)
    if base + numel >= readers[0].info(key).numel:  # the tensor's last slice: done with it
        for i in members:
            readers[i].release(key)


def _reduce_read(key: str, kind: np.dtype, numel: int, base: int, extents: list, stage: Stage,
                 workers: Workers, make: Callable, feed: list[Callable] | None = None) -> None:
    """One group of `_reduce` from files: blocks of `stage.block` elements of every input are read
    with pread into staging buffers by the stage's reader thread, one block ahead of the
    arithmetic (so on an idle core the copy costs no time); `make(sources, start)` gives the
    work on one block (see `_reduce`); `feed`, one per extent, takes each block's bytes as
    they are read (the content hashes), in the reader thread, while they are in cache. Its
    CRC-32 releases the GIL, so the arithmetic threads are not held up; measured on 2 cores
    (docs/performance.md), this placement cost least: a hashing thread of its own, or the
    hash in the arithmetic thread, cost more."""
    itemsize = kind.itemsize
    block = stage.block
    starts = list(range(0, numel, block))

    def read(b: int):
        n = min(block, numel - starts[b]) * itemsize
        for j, (ext, buf) in enumerate(zip(extents, stage.sets[b % 2])):
            pread_extent(ext, memoryview(buf[:n]), (base + starts[b]) * itemsize)
            if feed is not None and feed[j] is not None:
                feed[j](buf[:n])

    pending = stage.pool.submit(read, 0)
    try:
        for b, first in enumerate(starts):
            pending.result()
            pending = stage.pool.submit(read, b + 1) if b + 1 < len(starts) else None
            arrays = [a[: block * itemsize].view(kind) for a in stage.sets[b % 2]]
            end = min(first + block, numel)
            workers.run(make(lambda off, n, arrays=arrays: [a[off:off + n] for a in arrays],
                             first), end - first)
    finally:
        if pending is not None:  # never leave a read filling buffers about to be reused
            _settle(pending)


def _settle(future) -> None:
    try:
        future.result()
    except Exception:  # an error already on its way out says what went wrong
        pass


def read_copy(reader: ReaderBase, key: str):
    """A copy of one tensor: its raw bytes (a numpy uint8 array) read with pread where the
    reader can locate it, else a torch tensor."""
    info = reader.info(key)
    if info.numel == 0:
        return np.empty(0, np.uint8)
    ext = reader.locate(key)
    if ext is None:
        value = reader.read(key).clone()
        reader.release(key)
        return value
    raw = np.empty(info.nbytes, np.uint8)
    pread_extent(ext, memoryview(raw))
    return raw


BLOCK = 4 * CHUNK  # elements of each input read ahead at a time, at most


STAGE_BYTES = 16 << 20  # one set of staging buffers, at most (when the block allows)


class Stage:
    """Two sets of staging buffers (one block of `itemsize`-byte elements per input read at
    once) and the thread that fills them: pread of block b + 1 overlaps the arithmetic on b.
    The block shrinks (to one chunk at least) so that a set stays within STAGE_BYTES."""

    def __init__(self, count: int, itemsize: int):
        fits = STAGE_BYTES // (count * itemsize) // CHUNK * CHUNK
        self.block = max(min(BLOCK, fits), min(BLOCK, CHUNK))
        self.sets = [[np.empty(self.block * itemsize, np.uint8) for _ in range(count)]
                     for _ in range(2)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
