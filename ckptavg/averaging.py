"""The streaming engine in three steps: select, plan, execute.

`select` (select.py) opens each input once and orders and filters them. `make_plan` checks
that they agree and fixes everything the run will do: weights, output tensor specs, ties,
metadata, bytes (what a dry run reports). `execute(plan, writer, keys)` walks tensor by
tensor over any subset of keys: for each key the tensor is read from every input in turn and
folded into one float64 (or float32) accumulator, so peak memory is a few tensors: never the
model, never the number of inputs. Integer and bool tensors are not averaged: the newest
input's value is kept. `average` strings the three together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptavg import __version__, arith, options, profiles
from ckptavg.distributed import Group, world_size, write_shards
from ckptavg.errors import CkptavgError, MismatchError, NonFiniteError, OptionError
from ckptavg.io import ReaderBase, SourceFile, TensorSpec, dtypes, make_writer, open_checkpoint
from ckptavg.io.base import MAX_SIDE_FILE, pread_extent
from ckptavg.io.dtypes import DType, import_torch
from ckptavg.io.writer import (
    SIDE_FILES,
    BackgroundWriter,
    Writer,
    check_output,
    exclusive_lock,
    output_kind,
)
from ckptavg.options import Accumulate, Method, OutDtype, check_choice
from ckptavg.select import (
    Candidate,
    close_all,
    files_of,
    leave_out_outputs,
    open_candidates,
    refuse_shared_files,
    select,
)

Progress = Callable[[int, int], None]
OUT_DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16,
              "float64": dtypes.float64}
SHOWN = 3  # problems listed per file in a mismatch error


@dataclass
class AverageResult:
    """What a run did (or, for a dry run, would do). `inputs` and `weights` are what was
    applied, in order: with `into`, the running average comes first, weighted by its n."""

    inputs: list[str]
    weights: list[float]
    method: Method
    output: str | None
    n: int
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dry_run: bool = False
    epochs: list[int | None] = field(default_factory=list)
    epoch_sources: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    step_sources: list[str] = field(default_factory=list)
    into: str | None = None
    skipped: list[str] = field(default_factory=list)  # already in the running average
    warnings: list[str] = field(default_factory=list)
    ranks: int = 1  # torch.distributed ranks that shared the work (torchrun)
    rank: int = 0
    profile: str | None = None  # the --profile spec the weights come from
    effective_n: float = 0.0  # 1 / sum(w^2) of the weights applied

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """Everything a run will do, fixed before any tensor is read."""

    readers: list[ReaderBase]
    weights: list[float]  # raw weights; the average divides by their sum
    specs: list[TensorSpec]  # output specs, in output order
    ties: dict[str, str]
    metadata: dict[str, str]
    accumulate: Accumulate = "float64"
    allow_nonfinite: bool = False
    entry: str = "state_dict"  # where a torch output keeps the weights: the newest input's
    extras: dict = field(default_factory=dict)  # the newest input's carried configuration

    @property
    def total_weight(self) -> float:
        return sum(self.weights)

    @property
    def bytes_in(self) -> int:
        """Bytes read: every input's floating tensors, and the newest input's others."""
        last = self.readers[-1]
        return sum(r.info(s.key).nbytes for r in self.readers for s in self.specs
                   if r is last or r.info(s.key).dtype.is_floating_point)

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.specs)


def peak_rss_bytes() -> int:
    """Maximum resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sha256_of(files: list[SourceFile]) -> str:
    """sha256 of the files an input consists of, refusing a file changed since it was opened."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        with open(f.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (f.dev, f.ino, f.size, f.mtime_ns):
                raise CkptavgError(f"{f.path}: changed since it was opened; run again")
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def method_weights(n: int, method: Method, weights: Sequence[float] | None = None,
                   decay: float | None = None) -> list[float]:
    """Normalised per-input weights, oldest first.

    Args:
        n: number of inputs.
        method: "uniform", "weighted" (uses `weights`) or "ema" (uses `decay`).

    Returns:
        n weights that sum to 1.

    EMA follows torch's AveragedModel: the first input starts the average and each later one
    is folded in as `avg = decay * avg + (1 - decay) * w`; the oldest input keeps
    `decay ** (n - 1)`, each later one `(1 - decay) * decay ** (n - 1 - i)`.

    Example:
        >>> method_weights(3, "ema", decay=0.5)
        [0.25, 0.25, 0.5]
    """
    if method == "uniform":
        return [1.0 / n] * n
    if method == "weighted":
        ws = [float(w) for w in weights or []]
        if len(ws) != n:
            raise OptionError("weights", f"{len(ws)} given for {n} selected inputs; give one per input")
        if any(w < 0 or not math.isfinite(w) for w in ws) or sum(ws) <= 0:
            raise OptionError("weights", "must be finite, non-negative and not all zero")
        total = sum(ws)
        return [w / total for w in ws]
    if method == "ema":
        if decay is None or not 0.0 <= decay < 1.0:
            raise OptionError("ema", "the decay must be in [0, 1)", decay)
        return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)]
    raise CkptavgError(f"unknown averaging method {method!r}")


def _mismatches(readers: list[ReaderBase]) -> list[str]:
    """Problems (one string per file) where an input differs from the first."""
    ref = readers[0]
    ref_keys = ref.keys()
    ref_set = set(ref_keys)
    problems = []
    for r in readers[1:]:
        keys = set(r.keys())
        parts = []
        missing = [k for k in ref_keys if k not in keys]
        extra = [k for k in r.keys() if k not in ref_set]
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({', '.join(missing[:SHOWN])})")
        if extra:
            parts.append(f"extra {len(extra)} key(s) ({', '.join(extra[:SHOWN])})")
        diffs = []
        for k in ref_keys:
            if k in keys:
                a, b = ref.info(k), r.info(k)
                if a.shape != b.shape:
                    diffs.append(f"{k} {list(b.shape)} vs {list(a.shape)}")
                elif a.dtype != b.dtype:
                    diffs.append(f"{k} {b.dtype} vs {a.dtype}".replace("torch.", ""))
        if diffs:
            parts.append(f"{len(diffs)} shape/dtype difference(s) ({', '.join(diffs[:SHOWN])})")
        if parts:
            problems.append(f"{r.path}: {'; '.join(parts)}")
    return problems


def _carried_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    """model.* and data.* entries on which every input agrees."""
    return {k: v for k, v in metas[0].items()
            if k.startswith(("model.", "data.")) and all(m.get(k) == v for m in metas[1:])}


def check_options(accumulate: str, dtype: str | None) -> None:
    check_choice("accumulate", accumulate, Accumulate)
    if dtype is not None:
        check_choice("dtype", dtype, OutDtype)


def make_plan(readers: list[ReaderBase], weights: list[float], *, method: str = "uniform",
              n_total: int | None = None, prior_inputs: list | None = None,
              accumulate: Accumulate = options.ACCUMULATE, dtype: OutDtype | None = None,
              allow_nonfinite: bool = False, hash_inputs: bool = False,
              profile: str | None = None) -> Plan:
    """Check that the inputs agree and fix the run: specs, ties, metadata.

    `readers` and `weights` are oldest first. With `prior_inputs` (the `average.inputs` of a
    running average), `readers[0]` is that running average and `n_total` counts its inputs.
    Raises MismatchError naming each file that differs from the first."""
    check_options(accumulate, dtype)
    problems = _mismatches(readers)
    if problems:
        raise MismatchError(
            f"inputs do not match {readers[0].path}: " + " | ".join(problems)
            + " -- average checkpoints of one architecture (and dtype), or align keys by "
            "stripping a prefix"
        )
    ref = readers[0]
    ties = dict(ref.ties())
    for r in readers[1:]:
        other = r.ties()
        ties = {k: v for k, v in ties.items() if other.get(k) == v}
    out_dtype = OUT_DTYPES.get(dtype) if dtype else None
    specs = []
    for k in ref.keys():
        info = ref.info(k)
        floating = info.dtype.is_floating_point
        specs.append(TensorSpec(k, info.shape, out_dtype if out_dtype and floating else info.dtype))
    n_total = n_total or len(readers)
    new = readers[1:] if prior_inputs is not None else readers
    entries = [{"file": os.path.basename(r.path.rstrip(os.sep)), "fingerprint": r.fingerprint()}
               for r in new]
    if hash_inputs:
        for e, r in zip(entries, new):
            e["sha256"] = sha256_of(r.files)
    has_bn = any(s.key.endswith(("running_mean", "running_var")) for s in specs)
    metadata = {
        "ckptavg.version": __version__,
        **_carried_metadata([r.metadata() for r in readers]),
        "average.n": str(n_total),
        "average.method": method,
        "average.weights": json.dumps([1.0 / n_total] * n_total if prior_inputs is not None
                                      else [w / sum(weights) for w in weights]),
        "average.inputs": json.dumps(list(prior_inputs or []) + entries),
        "average.accumulate": accumulate,
        **({"average.profile": profile} if profile else {}),
        "bn.stale": "true" if has_bn else "false",
    }
    newest = readers[-1]
    return Plan(readers, list(weights), specs, ties, metadata, accumulate, allow_nonfinite,
                torch_entry(newest), newest.extras())


def torch_entry(newest: ReaderBase) -> str:
    """Where a torch output keeps the weights: under the newest input's own top-level entry
    (`state_dict`, `model`, `model_state_dict`...), so the user's loader finds them where it
    found the inputs'; `state_dict` for a plain state dict or a nested entry."""
    loc = newest.location
    return loc if loc not in ("<top level>", "metadata") and "/" not in loc else "state_dict"


def carried_notes(newest: ReaderBase) -> list[str]:
    """Warnings for what carrying the newest input's configuration into a torch output
    converted or left out."""
    return [f"{newest.path}: {n} (a torch output holds plain values only, so that "
            "torch.load(weights_only=True) reads it)" for n in newest.extras_notes]


def execute(plan: Plan, writer: Writer, keys: Sequence[str] | None = None,
            progress: Progress | None = None, threads: int | None = options.AVERAGE_THREADS) -> None:
    """The tensor-major loop over `keys` (default: all, in plan order) into `writer`.

    Each tensor is reduced chunk by chunk (`_reduce`) into an output buffer; a writer thread
    copies it to the file while the next tensor is reduced into the other of two buffers.
    Inputs are read with pread by a reader thread one block ahead (or, where a reader cannot
    locate a tensor in a file, as views of the mapped file). Scratch memory: cache-sized
    chunks, two staging blocks per input read at once, and two output buffers of the largest
    tensor or slice, whatever N is. The arithmetic (numpy, see arith.py) runs on `threads`
    threads, each on its own share of every block (default: the cores idle when it starts,
    less the one the reader thread keeps busy; see idle_cores)."""
    n = threads or max(1, idle_cores() - 1)
    pool = ThreadPoolExecutor(n - 1, thread_name_prefix="ckptavg-sum") if n > 1 else None
    try:
        _execute(plan, writer, keys, progress, Workers(n, pool))
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
             progress: Progress | None, workers: Workers) -> None:
    readers, ref = plan.readers, plan.readers[0]
    wanted = set(keys) if keys is not None else None
    specs = [s for s in plan.specs if wanted is None or s.key in wanted]
    floats = [s for s in specs if ref.info(s.key).dtype.is_floating_point]
    max_numel = max((s.numel for s in floats), default=0)
    wide = plan.accumulate == "float64" or any(ref.info(s.key).dtype == dtypes.float64
                                               for s in floats)
    acc = np.dtype(np.float64 if wide else np.float32)
    # A writer that streams can take a large tensor in slices: then the output buffers (and
    # the float64 accumulator of more than GROUP inputs) are a slice, not the largest tensor.
    streams = writer.streams_parts and not writer.keeps_tensors

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
    bg = None if writer.keeps_tensors else BackgroundWriter(
        writer, [np.empty(out_bytes, np.uint8) for _ in range(2)])
    total_bytes, done, last = plan.bytes_in, 0, readers[-1]
    try:
        for spec in specs:
            if writer.shares_ties and spec.key in plan.ties:
                continue  # torch and DCP writers point tied names at one tensor
            info = ref.info(spec.key)
            if not info.dtype.is_floating_point:
                done += info.nbytes
                _hand_over(writer, bg, spec, read_copy(last, spec.key), None)
                if progress:
                    progress(done, total_bytes)
                continue
            step = slice_of(spec)
            kind = arith.storage(spec.dtype)
            for lo in range(0, max(spec.numel, 1), max(step, 1)):
                n = min(step, spec.numel - lo)
                buf = bg.buffer() if bg is not None else np.empty(n * spec.dtype.itemsize, np.uint8)
                out = buf[: n * spec.dtype.itemsize].view(kind)
                finite = _reduce(plan, spec.key, spec.dtype, out, workers,
                                 None if full is None else full[:n], lo, stage)
                done += n * info.dtype.itemsize * len(readers)
                if progress:
                    progress(done, total_bytes)
                if not finite and not plan.allow_nonfinite:
                    _raise_nonfinite(readers, spec.key, spec.dtype)
                if n == spec.numel:
                    _hand_over(writer, bg, spec, out, buf)
                else:
                    bg.write(spec.key, out, buf, part=(lo == 0, lo + n == spec.numel))
        if bg is not None:
            bg.finish()
    finally:
        if bg is not None:
            bg.stop()
        if stage is not None:
            stage.close()


CHUNK = 1 << 16  # elements per step: a float64 accumulator of 512 KiB stays in L2 cache
SLICE = 64 << 20  # output bytes computed and written at a time: a larger tensor goes in slices


def _slice_elems(dtype: DType) -> int:
    return max(CHUNK, SLICE // dtype.itemsize // CHUNK * CHUNK)


RESIDENT = 64 << 20  # bytes of mapped input pages kept between releases, over a group
GROUP = 32  # inputs read at once; more are summed group by group (memory flat in N)
FAULT_AROUND = 64 << 10  # the kernel maps up to this much around a page fault (its default)


def _reduce(plan: Plan, key: str, out_dtype: DType, out: np.ndarray, workers: Workers,
            full: np.ndarray | None, base: int = 0, stage: Stage | None = None) -> bool:
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
            _reduce_read(key, kind, numel, base, extents, stage, workers,
                         lambda srcs, start, first=g == 0, m=members: chunks(
                             srcs, m, first, finish, start))
            continue
        flats = [_as_numpy(readers[i].read(key), kind)[base:base + numel] for i in members]
        # Release each input's pages often enough that the inputs read together keep at
        # most RESIDENT bytes mapped in.
        release_every = max(CHUNK, RESIDENT // (len(members) * kind.itemsize) // CHUNK * CHUNK)
        for lo in range(0, numel, release_every):
            n = min(release_every, numel - lo)
            workers.run(chunks(lambda off, k, lo=lo, fs=flats: [f[lo + off:lo + off + k] for f in fs],
                               members, g == 0, finish, lo), n)
            # Reach back: faults map pages around them, also some released before.
            start = (base + lo) * kind.itemsize - FAULT_AROUND
            for i in members:
                readers[i].release_range(key, start, (base + lo + n) * kind.itemsize - start)
        if base + numel >= readers[0].info(key).numel:  # the tensor's last slice: done with it
            for i in members:
                readers[i].release(key)
    if full is not None:
        def finish_full(s: arith.Scratch, lo: int, hi: int) -> None:
            for off in range(lo, hi, CHUNK):
                end = min(off + CHUNK, hi)
                finish_chunk(s, full[off:end], out[off:end])

        workers.run(finish_full, numel)
    return finite[0]


def _as_numpy(t, kind: np.dtype) -> np.ndarray:
    """A read tensor (a view of a mapped file) as a flat numpy array of its raw storage."""
    torch = import_torch()
    flat = t.reshape(-1)
    if flat.dtype in (torch.float64, torch.float32, torch.float16):
        return flat.numpy()
    return flat.view(torch.uint8 if kind.itemsize == 1 else torch.int16).numpy().view(kind)


def _reduce_read(key: str, kind: np.dtype, numel: int, base: int, extents: list, stage: Stage,
                 workers: Workers, make: Callable) -> None:
    """One group of `_reduce` from files: blocks of `stage.block` elements of every input are read
    with pread into staging buffers by the stage's reader thread, one block ahead of the
    arithmetic (so on an idle core the copy costs no time); `make(sources, start)` gives the
    work on one block (see `_reduce`)."""
    itemsize = kind.itemsize
    block = stage.block
    starts = list(range(0, numel, block))

    def read(b: int):
        n = min(block, numel - starts[b]) * itemsize
        for ext, buf in zip(extents, stage.sets[b % 2]):
            pread_extent(ext, memoryview(buf[:n]), (base + starts[b]) * itemsize)

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


def _hand_over(writer: Writer, bg, spec: TensorSpec, data, buf) -> None:
    """Give one whole tensor to the writer: raw bytes (numpy) to a file writer, a torch
    tensor of the spec's dtype and shape to one that keeps tensors (torch, DCP)."""
    if writer.keeps_tensors:
        writer.write(spec.key, _as_tensor(data, spec))
    elif bg is None:
        writer.write(spec.key, data)
    else:
        bg.write(spec.key, data, buf)


def _as_tensor(data, spec: TensorSpec):
    torch = import_torch()
    if isinstance(data, torch.Tensor):
        return data.view(spec.shape)
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    return raw.view(spec.dtype.torch).view(spec.shape) if spec.numel else \
        torch.empty(spec.shape, dtype=spec.dtype.torch)


def _raise_nonfinite(readers: list[ReaderBase], key: str, dtype: DType) -> None:
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
    flat = None if ext is not None else _as_numpy(reader.read(key), kind)
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


def _running_n(reader: ReaderBase) -> tuple[int, list]:
    meta = reader.metadata()
    n0 = meta.get("average.n") or meta.get("swa.n_averaged", "")  # ours, or AveragedModel's
    if not n0.isdigit() or int(n0) < 1:
        raise CkptavgError(
            f"{reader.path}: no average.n metadata, so the number of checkpoints in it is "
            "unknown; a running average must be a file written by ckptavg average (or an "
            "AveragedModel state dict with n_averaged)"
        )
    try:
        prior = json.loads(meta.get("average.inputs", "[]"))
    except json.JSONDecodeError:
        prior = []
    return int(n0), prior if isinstance(prior, list) else []


def average(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    ema: float | None = None,
    profile: str | None = None,
    into: str | os.PathLike | None = None,
    from_epoch: int | None = None,
    to_epoch: int | None = None,
    from_step: int | None = None,
    to_step: int | None = None,
    last: int | None = None,
    every: int | None = None,
    cycle_ends: bool = False,
    best: int | None = None,
    metric: str | None = None,
    lowest: bool = False,
    key: str | None = None,
    strip_prefix: str | None = None,
    accumulate: Accumulate = options.ACCUMULATE,
    dtype: OutDtype | None = None,
    shard_size: int | None = None,
    allow_nonfinite: bool = False,
    hash_inputs: bool = False,
    dry_run: bool = False,
    threads: int | None = options.AVERAGE_THREADS,
    dcp: bool = False,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints into one, streaming one tensor at a time.

    Args:
        inputs: checkpoint paths or glob patterns (safetensors, sharded folders, torch files).
        output: where to write; the suffix picks the format (.safetensors, .pt, a folder).
            With `into` and no output, the running average is updated in place.
        weights: one weight per selected input (normalised); `ema` a decay instead.
        profile: weights from where each input was saved (its step, else its epoch), a
            spec of profiles.py: "ema:halflife=H", "ema:decay=D,per=P",
            "power:sigma_rel=S", "power:gamma=G", "wsm:linear|minus-sqrt|cosine", "time",
            "uniform".
        into: an existing average (with `average.n` metadata) to fold the inputs into,
            under an exclusive lock: the result equals averaging all of its inputs and the
            new ones at once. `key` and `strip_prefix` apply to the inputs, not to it.
        from_epoch, to_epoch, from_step, to_step, last, every, cycle_ends: input selection
            (see select.py; epochs and steps come from metadata, the checkpoint's own entries
            or the name, and a step is never taken for an epoch).
        best, metric, lowest: keep the `best` inputs by a stored metric (metadata such as
            train.val_acc, or a number in the checkpoint such as timm's `metric`), highest
            first unless `lowest`.
        accumulate: "float64" (default) or "float32".
        dtype: output dtype for floating tensors; default: each tensor's input dtype.
        threads: threads for the arithmetic, each on its share of every block; default:
            the cores idle at the start less the one that reads ahead (`idle_cores`).
        dcp: write `output` as a torch.distributed.checkpoint folder (new or empty), which
            `dcp.load` and FSDP read; the weights keep the newest input's entry (`model`,
            `state_dict`) or stay at the top level. DCP saves a state dict at once, so the
            output is held in memory until it is written (under torchrun: each rank's share).

    Returns:
        An `AverageResult` with the inputs and weights applied, sizes, time and peak memory.

    Example:
        >>> ckptavg.average(["runs/a/epoch-0126.safetensors", ...], "swa.safetensors")
    """
    t0 = time.perf_counter()
    if weights is not None and ema is not None:
        raise OptionError(("weights", "ema"), "exclude each other; pick one")
    prof = profiles.parse(profile) if profile is not None else None
    spec = prof.spec if prof is not None else None  # as parsed: what metadata records
    if prof is not None and (weights is not None or ema is not None or into is not None):
        raise OptionError(("profile", "weights" if weights is not None else "ema"
                           if ema is not None else "into"),
                          "exclude each other: a profile gives every weight (and a running "
                          "average folds a uniform mean)")
    if into is not None:
        into = os.fspath(into)
        if not os.path.exists(into):
            raise CkptavgError(f"{into}: no such file; folding into a running average needs an "
                               "existing one (make the first with an output, -o)")
        if weights is not None or ema is not None:
            raise OptionError(("into", "weights", "ema"), "a running average folds a uniform "
                              "mean; drop the weights or the EMA decay")
        output = into if output is None else output
    if output is None and not dry_run:
        raise OptionError("output", "missing: pass an output path (.safetensors, .pt or a folder)")
    output = os.fspath(output) if output is not None else None
    kind = output_kind(output, shard_size, dcp) if output is not None else None  # before reading
    check_options(accumulate, dtype)
    method: Method = ("ema" if ema is not None else "weighted" if weights is not None
                      else "profile" if prof is not None else "uniform")
    select_args = (from_epoch, to_epoch, cycle_ends, every, last, from_step, to_step, best,
                   metric, lowest)
    if world_size() > 1:
        if into is not None:
            raise OptionError("into", "folding into a running average runs in one process; "
                              "run it without torchrun")
        if not dry_run and kind not in ("sharded", "dcp"):
            raise OptionError("output", f"{output}: under torchrun each rank writes one shard, so the "
                               "output is a folder; give a folder name (-o OUT_DIR)")
        with Group() as group:
            result = _average_ranks(group, [os.fspath(p) for p in inputs], output, kind, method,
                                    weights, ema, prof, select_args, key, strip_prefix, accumulate,
                                    dtype, allow_nonfinite, hash_inputs, dry_run, threads,
                                    progress)
        result.seconds = time.perf_counter() - t0
        result.peak_rss_bytes = peak_rss_bytes()
        return result

    with contextlib.ExitStack() as stack:
        locked = stack.enter_context(exclusive_lock(into)) if into is not None else None
        opened = open_candidates([os.fspath(p) for p in inputs], key, strip_prefix)
        stack.callback(close_all, opened)
        cands, left_out = leave_out_outputs(opened, locked.identity if locked else None)
        chosen = select(cands, *select_args)
        skipped: list[str] = []
        running, prior, n0 = None, None, 0
        if locked is not None:
            running = stack.enter_context(open_checkpoint(into))
            if os.path.isfile(into) and running.files[0].identity != locked.identity:
                raise CkptavgError(f"{into}: was replaced while being locked; run again")
            n0, prior = _running_n(running)
            chosen, skipped = _not_yet_folded(chosen, prior)
            if not chosen:
                return _nothing_to_fold(into, n0, skipped, dry_run, t0)
        raw = _chosen_weights(chosen, method, weights, ema, prof)
        readers, n_total = [c.reader for c in chosen], len(chosen)
        if running is not None:
            readers, raw, n_total = [running] + readers, [float(n0)] + raw, n0 + len(chosen)
            refuse_shared_files(readers)  # the inputs among themselves: open_candidates
        in_place = into is not None and _same(into, output)
        # Every input opened (chosen, left out by the selection or as an output of ours)
        # and the running average, unless it is rewritten in place.
        protected = [f for f in files_of(opened)
                     if not (in_place and f.identity == locked.identity)]
        if running is not None and not in_place:
            protected += running.files
        if output is not None:  # before hashing or reading any tensor
            check_output(output, kind, protected)
        plan = make_plan(readers, raw, method=method, n_total=n_total, prior_inputs=prior,
                         accumulate=accumulate, dtype=dtype, allow_nonfinite=allow_nonfinite,
                         hash_inputs=hash_inputs and not dry_run, profile=spec)
        result = _result(plan, chosen, into, output, method, n_total, dry_run, spec)
        result.skipped = skipped
        result.warnings = left_out + [f"{p}: already folded into {into} (same fingerprint in its "
                           "average.inputs); skipped" for p in skipped] + _mixed_runs(chosen)
        if n_total == 1:
            result.warnings.append(f"{chosen[0].path}: the only input, so the output is a copy "
                                   "of it (with ckptavg's metadata), not an average; select "
                                   "two or more inputs")
        if kind == "torch" and not output.lower().endswith(".bin"):
            result.warnings += carried_notes(readers[-1])
        if not dry_run:
            side, notes = side_files(readers) if kind == "sharded" else ({}, [])
            result.warnings += notes
            entry = dcp_entry(readers[-1]) if dcp else plan.entry
            with make_writer(output, plan.specs, plan.metadata, shard_size, plan.ties,
                             inputs=protected, entry=entry, extras=plan.extras,
                             side_files=side, dcp=dcp) as writer:
                execute(plan, writer, progress=progress, threads=threads)
                for r in readers:
                    r.check_unchanged()
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def dcp_entry(newest: ReaderBase) -> str | None:
    """Where a DCP output keeps the weights: the newest input's entry, else the top level."""
    return newest.location if newest.location in ("state_dict", "model") else None


def _chosen_weights(chosen: list[Candidate], method: Method, weights, ema,
                    prof: profiles.Profile | None) -> list[float]:
    """The raw weights of the chosen inputs: a profile's, from their positions, or those of
    `_raw_weights`."""
    if prof is None:
        return _raw_weights(len(chosen), method, weights, ema)
    return profiles.weights(prof, profile_positions(chosen))


def profile_positions(chosen: list[Candidate]) -> list[int]:
    """Where each input was saved, as a profile counts: every input's step when all have
    one, else every input's epoch (the positions --dry-run shows)."""
    if all(c.step is not None for c in chosen):
        return [c.step for c in chosen]
    if all(c.epoch is not None for c in chosen):
        return [c.epoch for c in chosen]
    lacking = next(c for c in chosen if c.epoch is None)
    raise OptionError("profile", f"weights inputs by where they were saved, and {lacking.path} "
                      "has no step or epoch (no metadata, checkpoint entry or number in its "
                      "name); name the files by epoch or step, or drop the profile")


def _raw_weights(n: int, method: Method, weights, ema) -> list[float]:
    """The weights the plan applies: 1 per input for a uniform mean (so --into can weight the
    running average by its count), else the normalised weights or EMA decays."""
    norm = method_weights(n, method, weights, ema)
    return list(norm) if method != "uniform" else [1.0] * n


def _average_ranks(group: Group, inputs: list[str], output: str | None, kind: str | None,
                   method: Method, weights, ema, prof, select_args: tuple, key, strip_prefix,
                   accumulate, dtype, allow_nonfinite, hash_inputs, dry_run, threads,
                   progress) -> AverageResult:
    """`average` on one of several ranks: the same selection and plan everywhere, then this
    rank's share of the tensors (see distributed.py). Failures are agreed on, never hung on."""
    with contextlib.ExitStack() as stack:
        error, plan, result = None, None, None
        try:
            opened = open_candidates(inputs, key, strip_prefix)
            stack.callback(close_all, opened)
            cands, left_out = leave_out_outputs(opened)
            chosen = select(cands, *select_args)
            raw = _chosen_weights(chosen, method, weights, ema, prof)
            readers = [c.reader for c in chosen]
            if output is not None:
                check_output(output, kind, files_of(opened))
            plan = make_plan(readers, raw, method=method, accumulate=accumulate, dtype=dtype,
                             allow_nonfinite=allow_nonfinite, hash_inputs=hash_inputs and not dry_run,
                             profile=prof.spec if prof else None)
            result = _result(plan, chosen, None, output, method, len(chosen), dry_run,
                             prof.spec if prof else None)
            result.warnings = left_out + _mixed_runs(chosen)
        except BaseException as e:
            error = e
        group.agree(error)
        if not dry_run:
            side, notes = side_files(plan.readers)
            result.warnings += notes
            write_shards(plan, output, group, execute, progress, threads, side,
                         dcp_entry(plan.readers[-1]) if kind == "dcp" else False)
        result.ranks, result.rank = group.size, group.rank
        return result


def _same(a: str, b: str | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _result(plan: Plan, chosen: list[Candidate], into: str | None, output: str | None,
            method: str, n_total: int, dry_run: bool,
            profile: str | None = None) -> AverageResult:
    total = plan.total_weight
    pos = [c.position for c in chosen]
    head = [into] if into is not None else []
    applied = [w / total for w in plan.weights]
    return AverageResult(
        inputs=head + [c.path for c in chosen],
        weights=applied,
        method=method, output=output, n=n_total, tensors=len(plan.specs),
        bytes_in=plan.bytes_in, bytes_out=plan.bytes_out, dry_run=dry_run,
        epochs=[None] * len(head) + [p.epoch for p in pos],
        epoch_sources=["running average"] * len(head) + [p.epoch_from for p in pos],
        steps=[None] * len(head) + [p.step for p in pos],
        step_sources=["running average"] * len(head) + [p.step_from for p in pos],
        into=into, profile=profile, effective_n=profiles.effective_n(applied),
    )


def side_files(readers: list[ReaderBase]) -> tuple[dict[str, bytes], list[str]]:
    """The model-folder files (config.json, tokenizer files) of folder inputs, for a folder
    output: the newest input's copy of each, with a warning naming any that differ."""
    found: dict[str, list[bytes]] = {}
    for r in readers:
        if not os.path.isdir(r.path):
            continue
        for name in SIDE_FILES:
            p = os.path.join(r.path, name)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) <= MAX_SIDE_FILE:
                with open(p, "rb") as f:
                    found.setdefault(name, []).append(f.read())
    notes = [f"{name} differs between the input folders; the newest input's copy was taken"
             for name, copies in found.items() if len(set(copies)) > 1]
    return {name: copies[-1] for name, copies in found.items()}, notes


def _not_yet_folded(chosen: list[Candidate], prior: list) -> tuple[list[Candidate], list[str]]:
    """Split the inputs into those not yet in the running average and those already in it
    (same fingerprint recorded in its average.inputs)."""
    done = {e.get("fingerprint") for e in prior if isinstance(e, dict)} - {None}
    if not done:
        return chosen, []
    fresh, skipped = [], []
    for c in chosen:
        (skipped.append(c.path) if c.reader.fingerprint() in done else fresh.append(c))
    return fresh, skipped


def _nothing_to_fold(into: str, n0: int, skipped: list[str], dry_run: bool,
                     t0: float) -> AverageResult:
    return AverageResult(
        inputs=[], weights=[], method="uniform", output=into, n=n0, tensors=0, bytes_in=0,
        bytes_out=0, seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
        dry_run=dry_run, into=into, skipped=skipped,
        warnings=[f"every input is already folded into {into}; nothing was written"])


RUN_KEYS = ("train.seed", "train.schedule", "model.arch", "model.kwargs", "data.name")


def _mixed_runs(chosen: list[Candidate]) -> list[str]:
    """A warning when the inputs record different runs (seed, schedule, model, data)."""
    out = []
    for k in RUN_KEYS:
        values = {c.metadata.get(k) for c in chosen} - {None}
        if len(values) > 1:
            out.append(f"the inputs come from different runs: {k} is "
                       f"{' / '.join(sorted(values))}; average one run's checkpoints")
    return out
