"""`average`: select the inputs, plan the run, execute it into a writer.

`select` (select.py) opens each input once and orders and filters them; `make_plan`
(plan.py) fixes what the run will do; `execute` (kernel.py) reduces tensor by tensor. This
module strings the three together, folds into a running average under a lock (`into`),
and hands a torchrun launch to shards.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import replace

from ckptavg import options
from ckptavg.engine import profiles
from ckptavg.engine.content import ContentHashes, refuse_same_tensors
from ckptavg.engine.kernel import execute
from ckptavg.engine.plan import (
    Request,
    check_options,
)
from ckptavg.engine.prepare import Run, choose, plan_run
from ckptavg.engine.result import AverageResult, nothing_to_fold
from ckptavg.engine.shards import average_ranks
from ckptavg.engine.write import write_run
from ckptavg.errors import OptionError
from ckptavg.io.outputs import (
    check_streamed_once,
    normalised,
    running_average,
)
from ckptavg.io.writer import Discard, output_kind
from ckptavg.options import Accumulate, Method, OutDtype, Reading, Selection
from ckptavg.parallel import Group, world_size
from ckptavg.results import Progress, peak_rss_bytes


def average(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    ema: float | None = None,
    profile: str | None = None,
    into: str | os.PathLike | None = None,
    selection: Selection | None = None,
    reading: Reading | None = None,
    accumulate: Accumulate = options.ACCUMULATE,
    dtype: OutDtype | None = None,
    shard_size: int | None = None,
    allow_nonfinite: bool = False,
    hash_inputs: bool = False,
    dry_run: bool = False,
    threads: int | None = options.AVERAGE_THREADS,
    dcp: bool = False,
    resume: bool = False,
    sweep: str | None = None,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints into one, streaming one tensor at a time.

    Args:
        inputs: checkpoint paths or glob patterns (safetensors, sharded folders, torch files).
        output: where to write; the suffix picks the format (.safetensors, .pt, a folder).
            With `into` and no output, the running average is updated in place.
        weights: one weight per selected input (normalised).
        ema: an EMA decay instead, as torch's AveragedModel applies it (`method_weights`).
        profile: weights from where each input was saved (its step, else its epoch), a
            spec of profiles.py: "ema:halflife=H", "ema:decay=D,per=P",
            "power:sigma_rel=S", "power:gamma=G", "wsm:linear|minus-sqrt|cosine", "time",
            "uniform".
        into: an existing average (with `average.n` metadata) to fold the inputs into,
            under an exclusive lock: the result equals averaging all of its inputs and the
            new ones at once. `key` and `strip_prefix` apply to the inputs, not to it.
        selection: which inputs take part (`Selection`: epoch and step windows, cycle
            ends, every K-th, the best N by a stored metric, the last N); epochs and steps
            come from metadata, the checkpoint's own entries or the name, and a step is never
            taken for an epoch. Default: every input.
        reading: where the weights are in each input (`Reading`: a torch checkpoint's
            entry, a key prefix to strip). `into` is read as it is.
        accumulate: "float64" (default) or "float32".
        dtype: output dtype for floating tensors; default: each tensor's input dtype.
        shard_size: write a sharded folder with shards of at most this many bytes.
        allow_nonfinite: average even where an input holds NaN or Inf (else refused).
        hash_inputs: record each input's sha256 in `average.inputs`.
        dry_run: read every input as the run would (checksums, NaN/Inf, duplicates) and
            return the plan; write nothing.
        threads: threads for the arithmetic, each on its share of every block; default:
            the cores idle at the start less the one that reads ahead (`idle_cores`).
        dcp: write `output` as a torch.distributed.checkpoint folder (new or empty), which
            `dcp.load` and FSDP read; the weights keep the newest input's entry (`model`,
            `state_dict`) or stay at the top level. The tensors are staged as safetensors
            shards beside the output, then saved from them (mapped, not held in memory) in
            one `dcp.save` (under torchrun: each rank its own shard, together).
        resume: finish a folder output (safetensors shards or `dcp`) that a failed or
            killed run left unfinished: the shards it completed are kept in
            `.NAME.ckptavg-partial` beside the output with the run's plan; they are checked
            (size, sha256) and only the missing ones are reduced. Inputs or options that
            would change a shard are refused by name. The result is that of an
            uninterrupted run (bitwise for shards; the same tensors for DCP). Folder
            outputs only.
        sweep: "window=W[,stride=S]": one average per position of a window sliding over
            the selected inputs (W inputs, or with an SI suffix W tokens: window=125B),
            each written to `output` as a folder (`window-FIRST-LAST` and the newest input's
            suffix) or a template with {index}, {first}, {last}; every input is read once,
            and each output is bitwise what `average` of its window gives (engine/sweep.py).
            A profile or EMA weights each window as it would weight that window alone.
        progress: called with (bytes read, bytes to read).

    Returns:
        An `AverageResult` with the inputs and weights applied, sizes, time and peak memory.

    Example:
        >>> r = ckptavg.average(["runs/a/epoch-0004.safetensors", "runs/a/epoch-0005.safetensors",
        ...                      "runs/a/epoch-0006.safetensors"], "swa.safetensors")
        >>> r.n, r.method, [round(w, 3) for w in r.weights]
        (3, 'uniform', [0.333, 0.333, 0.333])
        >>> ckptavg.average(["runs/a/*.safetensors"], dry_run=True,
        ...                 selection=ckptavg.Selection(from_epoch=4)).epochs
        [4, 5, 6]
    """
    t0 = time.perf_counter()
    req = _checked(Request(
        inputs=tuple(os.fspath(p) for p in inputs), output=output, kind=None, method="uniform",
        weights=None if weights is None else tuple(weights), ema=ema, profile=profile,
        selection=Selection.of(selection), reading=Reading.of(reading), accumulate=accumulate,
        dtype=dtype, allow_nonfinite=allow_nonfinite, hash_inputs=hash_inputs,
        dry_run=dry_run, threads=threads, resume=resume, into=into, shard_size=shard_size,
        dcp=dcp, sweep=sweep))
    if req.sweep is not None:
        from ckptavg.engine import sweep as sweeps

        return sweeps.average_sweep(req, sweeps.parse(req.sweep), req.shard_size, progress)
    if world_size() > 1:
        with Group() as group:
            result = average_ranks(group, req, progress)
    else:
        result = _one_process(req, progress, t0)
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _checked(asked: Request) -> Request:
    """What `average` was asked (`asked`: the caller's values, the profile a spec, the
    output a path as given, kind and method not yet known), checked (every option against
    the others) and resolved (paths in one spelling, the profile parsed, the output's kind,
    the method), before any file is opened: the same on every torchrun rank."""
    a = asked
    weights, ema, into, output, sweep = a.weights, a.ema, a.into, a.output, a.sweep
    if output is not None:
        check_streamed_once(normalised(output), world_size() > 1, into=into, resume=a.resume,
                            dcp=a.dcp, sweep=sweep)
    if weights is not None and ema is not None:
        raise OptionError(("weights", "ema"), "exclude each other; pick one")
    prof = profiles.parse(a.profile) if a.profile is not None else None
    if prof is not None and (weights is not None or ema is not None or into is not None):
        raise OptionError(("profile", "weights" if weights is not None else "ema"
                           if ema is not None else "into"),
                          "exclude each other: a profile gives every weight (and a running "
                          "average folds a uniform mean)")
    if into is not None:
        into = running_average(into)
        if weights is not None or ema is not None:
            raise OptionError(("into", "weights", "ema"), "a running average folds a uniform "
                              "mean; drop the weights or the EMA decay")
        output = into if output is None else output
    if output is None and not a.dry_run:
        raise OptionError("output", "missing: pass an output path (.safetensors, .pt or a "
                          "folder)" if sweep is None else "missing: a sweep writes one output "
                          "per window into a folder (-o DIR) or a name template "
                          "(-o 'w{last}.safetensors')")
    output = normalised(output) if output is not None else None
    kind = output_kind(output, a.shard_size, a.dcp) if output is not None and sweep is None \
        else None  # before reading
    if a.resume and kind not in ("sharded", "dcp"):
        raise OptionError("resume", "finishes a folder output (safetensors shards or --dcp); "
                          "a file is written in one go: run again without --resume")
    check_options(a.accumulate, a.dtype)
    method: Method = ("ema" if ema is not None else "weighted" if weights is not None
                      else "profile" if prof is not None else "uniform")
    if sweep is not None:
        for name, value in (("into", into), ("resume", a.resume), ("dcp", a.dcp)):
            if value:
                raise OptionError(("sweep", name), "a sweep writes new outputs, one per window; "
                                  "drop one of them")
    elif world_size() > 1:
        if into is not None:
            raise OptionError("into", "folding into a running average runs in one process; "
                              "run it without torchrun")
        if not a.dry_run and kind not in ("sharded", "dcp"):
            raise OptionError("output", "under torchrun each rank writes one shard, so the output "
                              "is a folder; give a folder name (-o OUT_DIR)", output)
    return replace(asked, output=output, kind=kind, method=method, profile=prof, into=into)


def _one_process(req: Request, progress: Progress | None, t0: float) -> AverageResult:
    """select -> plan -> execute, with the output checked once, before any tensor is read."""
    with contextlib.ExitStack() as stack:
        run = choose(req, stack)
        if not run.chosen:  # every input already in the running average
            done = nothing_to_fold(req.into, run.n0, run.skipped, req.dry_run, t0)
            done.warnings[:0] = run.left_out
            return done
        plan, result = plan_run(req, run)
        if req.dry_run:
            _dry_run(plan, run, result, progress, req.threads)
        else:
            write_run(req, plan, run, result, progress)
    return result


def _dry_run(plan, run: Run, result: AverageResult, progress, threads) -> None:
    """The read pass without the output: what the real run would refuse."""
    hashes = ContentHashes.of_plan(plan)
    execute(plan, Discard(), progress=progress, threads=threads, hashes=hashes)
    for r in plan.readers:
        r.check_unchanged()
    digests = (hashes.hexdigests() or [])[1 if run.running is not None else 0:]
    refuse_same_tensors([c.path for c in run.chosen], digests,
                        [(c.epoch, c.step) for c in run.chosen])
    result.content = digests


