"""What a run of `average` chooses and plans before any tensor is read, shared by one
process (engine/average.py) and torchrun's ranks (engine/shards.py): the inputs opened once
and selected, the running average locked and opened (`into`), the output checked against
every file it may not replace, the plan and the result it will report.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

from ckptavg.engine.content import hash_reader
from ckptavg.engine.plan import (
    Request,
    carried_notes,
    chosen_weights,
    make_plan,
    record_recipe,
)
from ckptavg.engine.result import make_result
from ckptavg.engine.select import (
    Candidate,
    close_all,
    files_of,
    is_output,
    leave_out_outputs,
    mixed_runs,
    open_candidates,
    order_basis,
    refuse_shared_files,
    select,
)
from ckptavg.errors import CkptavgError
from ckptavg.io import ReaderBase, open_checkpoint
from ckptavg.io.atomic import exclusive_lock
from ckptavg.io.files import stamp_change
from ckptavg.io.metadata import meta_int
from ckptavg.io.outputs import records_content
from ckptavg.io.writer import check_output


@dataclass
class Run:
    """One process's run as it is chosen: the inputs opened, those chosen, the running
    average (`into`) and what is protected from being written over."""

    opened: list[Candidate]
    chosen: list[Candidate]
    left_out: list[str]
    skipped: list[str] = field(default_factory=list)
    running: ReaderBase | None = None
    prior: list | None = None
    n0: int = 0
    protected: list = field(default_factory=list)


def open_inputs(req: Request, stack: contextlib.ExitStack,
                running: tuple | None = None) -> tuple[list[Candidate], list[Candidate], list[str]]:
    """Every input opened once (closed with `stack`): (all of them, those that are not an
    earlier output of ours or the running average of identity `running`, the warnings
    naming those left out)."""
    opened = open_candidates(list(req.inputs), req.reading.key, req.reading.strip_prefix)
    stack.callback(close_all, opened)
    cands, left_out = leave_out_outputs(opened, running)
    return opened, cands, left_out


def protected_files(opened: list[Candidate], cands: list[Candidate],
                    outputs: list[str | None]) -> list:
    """The files an output may not replace: every file of every input opened, but an
    earlier output of ours at one of `outputs` (the same command run again replaces it, as
    it would have written it)."""
    ours = {earlier_output(p, opened, cands) for p in outputs if p is not None} - {None}
    return [f for f in files_of(opened) if f.identity not in ours]


def choose(req: Request, stack: contextlib.ExitStack) -> Run:
    """Open every input once (and lock and open the running average), leave out earlier
    outputs, select, and fix what the output may not replace."""
    into = req.into
    locked = stack.enter_context(exclusive_lock(into)) if into is not None else None
    opened, cands, left_out = open_inputs(req, stack, locked.identity if locked else None)
    # the running average alone among the inputs: nothing to fold (said by the caller)
    chosen = select(cands, req.selection) if cands or locked is None else []
    run = Run(opened, chosen, left_out)
    if locked is not None:
        run.running = stack.enter_context(open_checkpoint(into))
        if os.path.isfile(into) and run.running.files[0].identity != locked.identity:
            raise CkptavgError(f"{into}: was replaced while being locked; run again")
        run.n0, run.prior = _running_n(run.running)
        run.chosen, run.skipped = _not_yet_folded(chosen, run.prior, into)
        if not run.chosen:
            return run
    in_place = into is not None and _same(into, req.output)
    # Every input opened (chosen, left out by the selection or as an output of ours) and
    # the running average, unless it is rewritten in place.
    run.protected = [f for f in protected_files(opened, cands, [req.output])
                     if not (in_place and f.identity == locked.identity)]
    if run.running is not None and not in_place:
        run.protected += run.running.files
    if req.output is not None:  # before hashing or reading any tensor
        check_output(req.output, req.kind, run.protected)
    return run


def plan_run(req: Request, run: Run):
    """The plan of the run and the result it will report (warnings included)."""
    chosen, running = run.chosen, run.running
    raw = chosen_weights(chosen, req.method, req.weights, req.ema, req.profile,
                         req.selection.given_order)
    readers, n_total = [c.reader for c in chosen], len(chosen)
    if running is not None:
        readers, raw, n_total = [running] + readers, [float(run.n0)] + raw, run.n0 + len(chosen)
        refuse_shared_files(readers)  # the inputs among themselves: open_candidates
    # Content hashes are taken in the read pass and filled into a local output's metadata
    # before its commit (engine/content.py); a remote output records each input's identity
    # and fingerprint.
    content = records_content(req.output, req.kind) and not req.dry_run
    plan = make_plan(readers, raw, method=req.method,
                     running=(n_total, run.prior) if running is not None else None,
                     accumulate=req.accumulate, dtype=req.dtype,
                     allow_nonfinite=req.allow_nonfinite,
                     hash_inputs=req.hash_inputs and not req.dry_run, profile=req.spec,
                     content=content)
    record_recipe(plan, [c.path for c in chosen], req.reading, req.output, req.dtype,
                  running=running is not None)
    result = make_result(plan, chosen, req.into, req.output, req.method, n_total, req.dry_run,
                         req.spec, order_basis(chosen, req.selection.given_order))
    result.skipped = run.skipped
    result.warnings = run.left_out + [f"{p}: already folded into {req.into} (recorded in its "
                                      "average.inputs); skipped" for p in run.skipped] \
        + mixed_runs(chosen) + [f"{r.path}: {n}" for r in readers for n in r.read_notes]
    if n_total == 1:
        result.warnings.append(f"{chosen[0].path}: the only input, so the output is a copy "
                               "of it (with ckptavg's metadata), not an average; select two "
                               "or more inputs")
    if req.kind == "torch" and not req.output.lower().endswith(".bin"):
        result.warnings += carried_notes(readers[-1])
    if plan.fp8 is not None and not plan.dequantize and plan.fp8.activations:
        result.warnings.append(
            f"{len(plan.fp8.activations)} activation scale(s) ({plan.fp8.activations[0]}"
            f"{', ...' if len(plan.fp8.activations) > 1 else ''}) are statistics of the "
            "inputs' activations, not weights: the output keeps the largest of the inputs' "
            "values; recalibrate them on the average for the best accuracy")
    return plan, result


def _running_n(reader: ReaderBase) -> tuple[int, list]:
    meta = reader.metadata()
    n0 = meta_int(meta, "average.n", minimum=1)  # ours, or AveragedModel's
    n0 = n0 if n0 is not None else meta_int(meta, "swa.n_averaged", minimum=1)
    if n0 is None:
        raise CkptavgError(
            f"{reader.path}: no average.n metadata, so the number of checkpoints in it is "
            "unknown; a running average must be a file written by ckptavg average (or an "
            "AveragedModel state dict with n_averaged)"
        )
    try:
        prior = json.loads(meta.get("average.inputs", "[]"))
    except json.JSONDecodeError:
        prior = []
    return n0, prior if isinstance(prior, list) else []


def earlier_output(output: str, opened: list[Candidate], kept: list[Candidate]):
    """The identity of the output file when it is an earlier output of ckptavg that the
    inputs' glob caught and that was left out as such: the same command run again replaces
    it, as it would have written it (the file is ours, and not an input of this run)."""
    try:
        st = os.stat(output)
    except OSError:
        return None
    ident = (st.st_dev, st.st_ino)
    for c in opened:
        files = c.reader.files  # a whole earlier output, never a shard of a folder output
        if c not in kept and is_output(c) and len(files) == 1 and files[0].identity == ident:
            return ident
    return None


def _same(a: str, b: str | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _not_yet_folded(chosen: list[Candidate], prior: list,
                    into: str) -> tuple[list[Candidate], list[str]]:
    """Split the inputs into those not yet in the running average and those already in it.

    An input is skipped unread only when an entry of its average.inputs records this very
    file: the same identity (device, inode, size, mtime, ctime; an object's ETag, size and
    time) and fingerprint. An input whose sampled fingerprint matches an entry but whose
    identity does not (rewritten, copied, or another file that differs only between the
    sampled blocks) is read and its content hash compared with the entry's; an entry with
    no content hash to compare (written by an older ckptavg, or to a folder) cannot settle
    it, and the run stops with one line."""
    entries = [e for e in prior if isinstance(e, dict) and isinstance(e.get("fingerprint"), str)]
    if not entries:
        return chosen, []
    fresh, skipped = [], []
    for c in chosen:
        same = [e for e in entries if e["fingerprint"] == c.reader.fingerprint()]
        if not same:
            fresh.append(c)
        elif any(stamp_change(e.get("identity"), c.reader.stamp()) is None for e in same):
            skipped.append(c.path)
        elif any(isinstance(e.get("content"), str) for e in same):
            if hash_reader(c.reader) in {e.get("content") for e in same}:
                skipped.append(c.path)
            else:
                fresh.append(c)
        else:
            raise CkptavgError(
                f"{c.path}: its fingerprint matches an input recorded in {into}, but not its "
                "identity, and the record holds no content hash to tell whether it is the "
                "same checkpoint (written by an older ckptavg); nothing was written: leave it "
                "out if it was folded already, or start a new running average with -o")
    return fresh, skipped
