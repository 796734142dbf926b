"""Many averages from one read: one average per window position along a run.

`average(..., sweep="window=W,stride=S")` writes one output per position of a sliding
window over the selected inputs (in training order), each a normal output of its format
with its own metadata (`average.inputs`, `average.window`), and reads every input once.

The pass is tensor-major like the kernel's (kernel.py) and, within a tensor, block by
block and input by input: each input's block is widened once, then folded into the running
sum of every window that holds it; the window that ends at that input is divided, rounded
and streamed to its output. Each window's sum takes its inputs in the same order, with the
same weights and the same operations as `average` of that window alone, so every output is
bitwise what a separate run gives. Memory is the open windows' sums of one block (the block
shrinks as windows grow, within BUDGET), two staging blocks and one output block: it does
not grow with N, W or the model.

Windows count inputs (`window=4`) or, with an SI suffix, span tokens (`window=125B`: the
inputs saved in (t - 125B, t] for an end t, where every input records the tokens it had
seen). The last window ends at the newest input; each earlier one `stride` inputs (or
tokens) before it. A token window is taken only where it is covered: t - W is at or after
the start of the span the oldest input stands for (t_1 - (t_2 - t_1), as profiles count).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ckptavg import options
from ckptavg.engine import arith
from ckptavg.engine.content import ContentHashes, placeholder, refuse_same_tensors
from ckptavg.engine.kernel import (
    CHUNK,
    Workers,
    _feeder,
    _hash_whole,
    _settle,
    idle_cores,
    read_copy,
)
from ckptavg.engine.nonfinite import raise_nonfinite
from ckptavg.engine.plan import (
    Plan,
    Request,
    carried_notes,
    chosen_weights,
    make_plan,
    record_recipe,
)
from ckptavg.engine.prepare import open_inputs, protected_files
from ckptavg.engine.result import AverageResult, make_result
from ckptavg.engine.select import (
    Candidate,
    mixed_runs,
    order_basis,
    select,
)
from ckptavg.errors import OptionError, OutputError
from ckptavg.io import make_writer
from ckptavg.io.base import TORCH_SUFFIXES
from ckptavg.io.files import pread_extent
from ckptavg.io.folder import side_files
from ckptavg.io.writer import (
    SAFETENSORS_SUFFIX,
    BackgroundWriter,
    Discard,
    Writer,
    check_output,
    output_kind,
)
from ckptavg.parallel import world_size
from ckptavg.results import Progress, peak_rss_bytes

FILE_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)  # an output that is one file
BUDGET = 64 << 20  # bytes of open windows' sums at a time (one block each)
MIN_BLOCK = 4096  # elements: the block never shrinks below this


@dataclass(frozen=True)
class Sweep:
    """A parsed `--sweep` spec: the window and the stride, each in inputs or in tokens."""

    spec: str
    window: int
    stride: int = 1
    window_tokens: bool = False
    stride_tokens: bool = False

    @property
    def unit(self) -> str:
        return "tokens" if self.window_tokens or self.stride_tokens else "inputs"


def parse(spec: str) -> Sweep:
    """`window=W[,stride=S]`: W and S count inputs, or with an SI suffix tokens (125B).

    Example:
        >>> parse("window=4,stride=2").window, parse("window=125B").window_tokens
        (4, True)
    """
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("window", "stride") or key in fields or not value.strip():
            raise OptionError("sweep", "give window=W[,stride=S]: W and S count inputs, or "
                              "tokens with an SI suffix (window=125B,stride=25B)", repr(spec))
        fields[key] = value.strip()
    if "window" not in fields:
        raise OptionError("sweep", "needs window=W (inputs, or tokens: window=125B)", repr(spec))

    def value(key: str) -> tuple[int, bool]:
        text = fields[key]
        tokens = not re.fullmatch(r"[0-9]+", text)
        n = options.count(text, "sweep")
        if n < 1:
            raise OptionError("sweep", f"{key} must be 1 or more", repr(spec))
        return n, tokens

    window, wt = value("window")
    stride, st = value("stride") if "stride" in fields else (1, False)
    return Sweep(str(spec).strip(), window, stride, wt, st)


def windows(sweep: Sweep, chosen: list[Candidate]) -> list[tuple[int, int]]:
    """The windows (first, last), indices into `chosen` (training order), oldest first."""
    n = len(chosen)
    if sweep.unit == "tokens":
        lacking = next((c for c in chosen if c.tokens is None), None)
        if lacking is not None:
            raise OptionError("sweep", f"counts tokens, and {lacking.path} records none (no "
                              "metadata train.tokens, trainer_state.json num_input_tokens_seen "
                              "or token count in the checkpoint); give the window and stride in "
                              "inputs (window=4)")
    pos = [c.tokens for c in chosen]
    ends, e = [], n - 1
    while e >= 0:
        ends.append(e)
        if sweep.stride_tokens:
            e = max((i for i in range(e) if pos[i] <= pos[e] - sweep.stride), default=-1)
        else:
            e -= sweep.stride
    out = []
    for e in reversed(ends):
        if sweep.window_tokens:
            lo = pos[e] - sweep.window
            start = pos[0] - (pos[1] - pos[0] if n > 1 else pos[0])
            if lo < start:
                continue
            first = next(i for i in range(e + 1) if pos[i] > lo)
        else:
            first = e - sweep.window + 1
            if first < 0:
                continue
        out.append((first, e))
    if not out:
        span = (f"{sweep.window} tokens" if sweep.window_tokens else f"{sweep.window} inputs")
        raise OptionError("sweep", f"no window of {span} fits the {n} selected input(s)"
                          + (f" (tokens {pos[0]}..{pos[-1]})" if sweep.unit == "tokens" else "")
                          + "; give a smaller window", repr(sweep.spec))
    return out


def _label(c: Candidate, unit: str, i: int) -> str:
    if unit == "tokens":
        return f"{c.tokens}"
    if c.step is not None:
        return f"step{c.step}"
    if c.epoch is not None:
        return f"epoch{c.epoch}"
    return f"input{i}"


def output_paths(output: str, spans: list[tuple[int, int]], chosen: list[Candidate],
                 sweep: Sweep, folders: bool = False) -> list[str]:
    """One path per window: `output` as a template with {index}, {first} and {last} (the
    window's bounds as positions), else a folder holding `window-FIRST-LAST` plus the
    newest input's suffix (.safetensors, .pt...; a sharded folder input, or `folders`,
    gives folders)."""
    labels = [(_label(chosen[a], sweep.unit, a), _label(chosen[b], sweep.unit, b))
              for a, b in spans]
    if "{" in output:
        try:
            paths = [output.format(index=j, first=f, last=la) for j, (f, la) in enumerate(labels)]
        except (KeyError, IndexError, ValueError) as e:
            raise OptionError("output", f"a sweep's output template takes {{index}}, {{first}} "
                              f"and {{last}} ({e})", output) from None
        if len(set(paths)) < len(paths):
            raise OptionError("output", "names the same file for two windows; put {index} or "
                              "{last} in the template", output)
        return paths
    if output.lower().endswith(FILE_SUFFIXES):
        raise OptionError("output", "names one file, and a sweep writes several outputs: give "
                          "a folder, or a name template with {index}, {first} or {last}",
                          output)
    newest = chosen[-1].reader
    name = os.path.basename(newest.path.rstrip("/"))
    if folders or len(newest.files) > 1 or os.path.isdir(newest.path):
        suffix = ""
    else:
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in FILE_SUFFIXES:
            suffix = SAFETENSORS_SUFFIX
    return [os.path.join(output, f"window-{f}-{la}{suffix}") for f, la in labels]


@dataclass
class _Prepared:
    """A sweep selected, planned and checked: the same on every torchrun rank."""

    chosen: list[Candidate]
    spans: list[tuple[int, int]]
    whole: Plan  # every input, once: what is read
    plans: list[Plan]  # one per window: what each output is
    paths: list[str | None]
    kinds: list[str | None]
    protected: list
    result: AverageResult


def average_sweep(req: Request, sweep: Sweep, shard_size: int | None = None,
                  progress: Progress | None = None) -> AverageResult:
    """`average` with `sweep`: every window position, from one read of every input (under
    torchrun each rank reads its share of the tensors and writes its shard of every window,
    so the windows are folders; io/writer.partition)."""
    t0 = time.perf_counter()
    if req.method == "weighted":
        raise OptionError(("sweep", "weights"), "weights are given per input of one average; "
                          "a sweep weights each window uniformly, by --ema or by a profile")
    ranked = world_size() > 1
    with contextlib.ExitStack() as stack:
        if ranked:
            from ckptavg.parallel import Group

            group = stack.enter_context(Group())
            prep, error = None, None
            try:
                prep = _prepare(req, sweep, shard_size, stack, folders=True)
            except BaseException as e:
                error = e
            group.agree(error)
            if not req.dry_run:
                _write_here(prep, req, shard_size, progress, group)
            prep.result.ranks, prep.result.rank = group.size, group.rank
        else:
            prep = _prepare(req, sweep, shard_size, stack, folders=False)
            _write_here(prep, req, shard_size, progress)
    result = prep.result
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    for r in result.windows:
        r.seconds, r.peak_rss_bytes = result.seconds, result.peak_rss_bytes
    return result


def _prepare(req: Request, sweep: Sweep, shard_size: int | None, stack: contextlib.ExitStack,
             folders: bool) -> _Prepared:
    """Open, select, window and plan; check every output before any tensor is read."""
    opened, cands, left_out = open_inputs(req, stack)
    chosen = select(cands, req.selection)
    spans = windows(sweep, chosen)
    readers = [c.reader for c in chosen]
    whole = make_plan(readers, [1.0] * len(readers), accumulate=req.accumulate,
                      dtype=req.dtype, allow_nonfinite=req.allow_nonfinite)
    if whole.fp8 is not None:
        raise OptionError("sweep", f"{'MXFP4' if whole.fp8.mx else 'FP8'} inputs are averaged "
                          "one run at a time; average each window with ckptavg average")
    paths = output_paths(req.output, spans, chosen, sweep, folders) if req.output \
        else [None] * len(spans)
    kinds = [output_kind(p, shard_size) if p else None for p in paths]
    if folders and any(k not in (None, "sharded") for k in kinds):
        raise OptionError("output", "under torchrun each rank writes one shard of every "
                          "window, so each window is a folder: give a folder, or a template "
                          "without a file suffix", req.output)
    protected = protected_files(opened, cands, paths)  # this sweep run again replaces its own
    for p, k in zip(paths, kinds):
        if p is not None:
            check_output(p, k, protected)
    basis = order_basis(chosen, req.selection.given_order)
    plans, results = [], []
    for j, ((a, b), path) in enumerate(zip(spans, paths)):
        part = chosen[a:b + 1]
        raw = chosen_weights(part, req.method, None, req.ema, req.profile,
                             req.selection.given_order)
        plan = make_plan([c.reader for c in part], raw, method=req.method,
                         accumulate=req.accumulate, dtype=req.dtype,
                         allow_nonfinite=req.allow_nonfinite,
                         hash_inputs=req.hash_inputs and not req.dry_run, profile=req.spec,
                         content=not req.dry_run)
        record_recipe(plan, [c.path for c in part], req.reading, path, req.dtype)
        plan.metadata["average.window"] = json.dumps({
            "sweep": sweep.spec, "index": j, "of": len(spans), "unit": sweep.unit,
            "first": _label(chosen[a], sweep.unit, a), "last": _label(chosen[b], sweep.unit, b)})
        plans.append(plan)
        results.append(make_result(plan, part, None, path, req.method, len(part), req.dry_run,
                                   req.spec, basis))
    result = make_result(whole, chosen, None, req.output, req.method, len(chosen), req.dry_run,
                         req.spec, basis)
    result.weights, result.windows, result.sweep = [], results, sweep.spec
    result.bytes_out = sum(p.bytes_out for p in plans)
    result.warnings = left_out + mixed_runs(chosen) \
        + [f"{r.path}: {n}" for r in readers for n in r.read_notes]
    if kinds and kinds[0] == "torch" and not paths[0].lower().endswith(".bin"):
        result.warnings += carried_notes(readers[-1])
    return _Prepared(chosen, spans, whole, plans, paths, kinds, protected, result)


def _write_here(prep: _Prepared, req: Request, shard_size: int | None, progress,
                group=None) -> None:
    """A writer per window, all open at once; each aborts on an error. Under torchrun
    (`group`) every window is a folder of which each rank writes its shard
    (io/writer.ShardedWriter with the group); the first window's writer exchanges the
    ranks' records of the whole run's content hashes, every window then takes its share."""
    made: list[str] = []
    if req.dry_run:
        writers: list[Writer] = [Discard() for _ in prep.plans]
    else:
        made = _make_folder(req.output) if group is None else \
            group.on_rank0(lambda: _make_folder(req.output), share=False) or []
        writers = []
        for p, k, plan in zip(prep.paths, prep.kinds, prep.plans):
            side, notes = side_files(plan.readers) if k == "sharded" else ({}, [])
            prep.result.warnings += [n for n in notes if n not in prep.result.warnings]
            writers.append(make_writer(p, plan.specs, plan.metadata, shard_size,
                                       prep.whole.ties, inputs=prep.protected,
                                       entry=plan.entry, extras=plan.extras, side_files=side,
                                       group=group))
    hashes = ContentHashes.of_plan(prep.whole)
    keys = writers[0].pending_keys() if group is not None else None
    if group is not None:
        writers[0].hashes = hashes  # its shard holds this rank's share: recorded, exchanged
    try:
        with contextlib.ExitStack() as out:
            for w in writers:
                out.enter_context(w)
            run_windows(prep.whole, prep.plans, prep.spans, writers, hashes, progress,
                        req.threads, keys=keys)
            for r in prep.whole.readers:
                r.check_unchanged()
            _digests(prep, hashes.hexdigests(writers[0].recorded() if group is not None
                                             else None))
            for w, r in zip(writers, prep.result.windows):
                if w.fills_metadata:
                    w.fill({placeholder(i): d for i, d in enumerate(r.content)})
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # ours, and empty: each writer left nothing
        raise
    for w in writers:
        prep.result.warnings += w.notes


def _make_folder(output: str) -> list[str]:
    """The sweep's folder (not a template's), made when missing: [it] if made here, for
    removal after a failure (it is then empty: every writer leaves nothing)."""
    if "{" in output or os.path.isdir(output):
        return []
    try:
        os.mkdir(output)
    except OSError as e:
        raise OutputError(f"{output}: cannot make the sweep's folder ({e.strerror}); make its "
                          "parent first") from None
    return [output]


def _digests(prep: _Prepared, digests: list[str] | None) -> list[str]:
    """The inputs' content hashes into the results, after refusing two inputs that hold
    the same tensors."""
    chosen = prep.chosen
    digests = digests or []
    refuse_same_tensors([c.path for c in chosen], digests, [(c.epoch, c.step) for c in chosen])
    prep.result.content = digests
    for (a, b), r in zip(prep.spans, prep.result.windows):
        r.content = digests[a:b + 1]
    return digests


def run_windows(whole: Plan, plans: list[Plan], spans: list[tuple[int, int]],
                writers: list[Writer], hashes: ContentHashes | None,
                progress: Progress | None = None, threads: int | None = None,
                keys: list[str] | None = None) -> None:
    """The one read: every tensor of every input once, into every window's output. The
    arithmetic (every input folded into W / S windows, a rounding per window) outweighs
    the reads here, so by default it takes every idle core (measured: docs/performance.md)."""
    n = threads or idle_cores()
    pool = ThreadPoolExecutor(n - 1, thread_name_prefix="ckptavg-sum") if n > 1 else None
    try:
        _Pass(whole, plans, spans, writers, hashes, progress, Workers(n, pool)).run(keys)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


class _Pass:
    def __init__(self, whole: Plan, plans: list[Plan], spans: list[tuple[int, int]],
                 writers: list[Writer], hashes: ContentHashes | None, progress, workers: Workers):
        self.whole, self.plans, self.spans, self.writers = whole, plans, spans, writers
        self.hashes, self.progress, self.workers = hashes, progress, workers
        self.readers = whole.readers
        ref = self.readers[0]
        self.floats = [s for s in whole.specs if ref.info(s.key).dtype.is_floating_point]
        wide = whole.accumulate == "float64" or any(ref.info(s.key).dtype.name == "float64"
                                                    for s in self.floats)
        self.acc = np.dtype(np.float64 if wide else np.float32)
        # windows holding each input: (window, its weight, first?, last?)
        self.holding: list[list[tuple[int, float, bool, bool]]] = [[] for _ in self.readers]
        for j, (a, b) in enumerate(spans):
            for i in range(a, b + 1):
                self.holding[i].append((j, plans[j].weights[i - a], i == a, i == b))
        most = max(len(h) for h in self.holding)
        fits = BUDGET // (most * self.acc.itemsize)
        self.block = max(MIN_BLOCK, fits // CHUNK * CHUNK if fits >= CHUNK else
                         fits // MIN_BLOCK * MIN_BLOCK)
        self.sums = [np.empty(self.block, self.acc) for _ in range(most)]
        widest = max((ref.info(s.key).dtype.itemsize for s in self.floats), default=1)
        self.stage = [np.empty(self.block * widest, np.uint8) for _ in range(2)]
        out_item = max((s.dtype.itemsize for s in self.floats), default=1)
        self.out_bytes = self.block * out_item
        self.bg: BackgroundWriter | None = None
        self.done = 0
        self.total = whole.bytes_in

    def run(self, keys: list[str] | None = None) -> None:
        """Every tensor in plan order; the outputs are written by one thread while the
        next blocks are read and summed (three output blocks in turn)."""
        reader_pool = ThreadPoolExecutor(1, thread_name_prefix="ckptavg-read")
        self.workers.prepare(min(self.block, CHUNK), self.acc)
        wanted = set(keys) if keys is not None else None
        self.bg = BackgroundWriter(self.writers[0],
                                   [np.empty(self.out_bytes, np.uint8) for _ in range(3)])
        try:
            for spec in self.whole.specs:
                if wanted is not None and spec.key not in wanted:
                    continue
                if self.writers[0].shares_ties and spec.key in self.whole.ties:
                    if self.hashes is not None:
                        self.hashes.tie(spec.key, self.whole.ties[spec.key])
                    continue
                if self.readers[0].info(spec.key).dtype.is_floating_point:
                    self._floating(spec, reader_pool)
                else:
                    self._kept(spec)
            self.bg.finish()
        finally:
            self.bg.stop()
            reader_pool.shutdown(wait=True)

    def _tick(self, nbytes: int) -> None:
        self.done += nbytes
        if self.progress:
            self.progress(self.done, self.total)

    def _kept(self, spec) -> None:
        """An integer or bool tensor: each window keeps its newest input's value."""
        copies: dict[int, object] = {}
        for (_, b), w in zip(self.spans, self.writers):
            if b not in copies:
                copies[b] = read_copy(self.readers[b], spec.key)
            self.bg.write(spec.key, copies[b], to=w)
        if self.hashes is not None:  # the last window ends at the newest input (`windows`)
            _hash_whole(self.hashes, self.readers, spec.key, copies[len(self.readers) - 1])
        self._tick(self.readers[-1].info(spec.key).nbytes)

    def _floating(self, spec, reader_pool: ThreadPoolExecutor) -> None:
        key, readers, hashes = spec.key, self.readers, self.hashes
        info = readers[0].info(key)
        dtype, numel = info.dtype, info.numel
        kind = arith.storage(dtype)
        out_kind = arith.storage(spec.dtype)
        extents = [r.locate(key) if numel else None for r in readers]
        flats = [None if e is not None or not numel else arith.as_numpy(r.read(key), kind)
                 for r, e in zip(readers, extents)]
        feed = [None if e is None or hashes is None else _feeder(hashes, i, key, e, info.nbytes)
                for i, e in enumerate(extents)]
        slot: dict[int, int] = {}  # window -> its sum
        free = list(range(len(self.sums)))
        block = self.block
        for lo in range(0, max(numel, 1), block):
            k = min(block, numel - lo)

            def read(i: int, lo=lo, k=k):
                if extents[i] is None:
                    src = flats[i][lo:lo + k] if flats[i] is not None else np.empty(0, kind)
                    if hashes is not None and flats[i] is not None:
                        hashes.update(i, key, src)
                    return src
                buf = self.stage[i % 2][:k * kind.itemsize]
                pread_extent(extents[i], memoryview(buf), lo * kind.itemsize)
                if feed[i] is not None:
                    feed[i](buf)
                return buf.view(kind)

            pending = reader_pool.submit(read, 0)
            try:
                for i in range(len(readers)):
                    src = pending.result()
                    pending = reader_pool.submit(read, i + 1) if i + 1 < len(readers) else None
                    ops = []
                    for j, w, first, last in self.holding[i]:
                        if first:
                            slot[j] = free.pop()
                        ops.append((self.sums[slot[j]], w, first, last, j))
                    ops.sort(key=lambda op: op[3])  # the window it ends last: rounding uses scratch
                    ending = [op for op in ops if op[3]]
                    buf = self.bg.buffer() if ending else None  # at most one window ends
                    out = None if buf is None else buf[:k * spec.dtype.itemsize].view(out_kind)
                    finite = [True]
                    self.workers.run(self._work(src, ops, dtype, spec.dtype, out, finite), k)
                    for _, _, _, _, j in ending:
                        free.append(slot.pop(j))
                        if not finite[0] and not self.plans[j].allow_nonfinite:
                            a, b = self.spans[j]
                            raise_nonfinite(readers[a:b + 1], key, spec.dtype)
                        part = None if k == numel else (lo == 0, lo + k == numel)
                        self.bg.write(key, out, buf, part, to=self.writers[j])
                    self._tick(k * dtype.itemsize)
            finally:
                if pending is not None:
                    _settle(pending)
        for i, r in enumerate(readers):
            if hashes is not None:
                hashes.done(i, key)
            r.release(key)

    def _work(self, src: np.ndarray, ops: list, dtype, out_dtype, out: np.ndarray | None,
              finite: list[bool]):
        """Fold one input's block into every window holding it; finish the one it ends
        into `out` (None when it ends none).
        The operations are those of arith.fold and the kernel's finish, value for value."""
        plans = self.plans

        def work(s: arith.Scratch, lo: int, hi: int) -> None:
            for off in range(lo, hi, CHUNK):
                n = min(CHUNK, hi - off)
                c = s.cast[:n]
                arith.widen(c, src[off:off + n], dtype, s)
                for acc, w, first, last, j in ops:
                    a = acc[off:off + n]
                    if first:
                        if w != 1.0:
                            np.multiply(c, w, out=a)
                        else:
                            np.copyto(a, c)
                    elif w != 1.0:
                        t = s.acc[:n]
                        np.multiply(c, w, out=t)
                        np.add(a, t, out=a)
                    else:
                        np.add(a, c, out=a)
                    if last:
                        np.divide(a, plans[j].total_weight, out=a)
                        o = out[off:off + n]
                        arith.narrow(o, a, out_dtype, s)
                        if not arith.all_finite(o, out_dtype):
                            finite[0] = False

        return work
