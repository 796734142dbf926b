"""`average`: select the inputs, plan the run, execute it into a writer.

`select` (select.py) opens each input once and orders and filters them; `make_plan`
(plan.py) fixes what the run will do; `execute` (kernel.py) reduces tensor by tensor. This
module strings the three together, folds into a running average under a lock (`into`),
and hands a torchrun launch to shards.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence

from ckptavg import options
from ckptavg.engine import profiles
from ckptavg.engine.content import ContentHashes, hash_reader, placeholder, refuse_same_tensors
from ckptavg.engine.kernel import execute
from ckptavg.engine.plan import (
    Request,
    carried_notes,
    check_options,
    chosen_weights,
    dcp_entry,
    make_plan,
    record_recipe,
)
from ckptavg.engine.result import AverageResult, make_result, nothing_to_fold
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
from ckptavg.engine.shards import average_ranks
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io import ReaderBase, make_writer, open_checkpoint
from ckptavg.io.atomic import exclusive_lock
from ckptavg.io.base import meta_int, stamp_change
from ckptavg.io.folder import side_files
from ckptavg.io.quantized import without_quantization
from ckptavg.io.remote import is_remote, local_path
from ckptavg.io.staging import describe, with_kept
from ckptavg.io.writer import Discard, check_output, output_kind
from ckptavg.options import Accumulate, Method, OutDtype, Reading, Selection
from ckptavg.parallel import Group, world_size
from ckptavg.results import Progress, peak_rss_bytes


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
    if output is not None and is_remote(os.fspath(output)):
        _check_remote(os.fspath(output), into, resume, dcp)
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
        into = local_path(os.fspath(into))
        if is_remote(into):
            raise OptionError("into", "folding into a running average in object storage is not "
                              "supported (it is updated under an exclusive file lock): fold "
                              "into a local copy, then upload it", into)
        if not os.path.exists(into):
            raise CkptavgError(f"{into}: no such file; folding into a running average needs an "
                               "existing one (make the first with an output, -o)")
        if weights is not None or ema is not None:
            raise OptionError(("into", "weights", "ema"), "a running average folds a uniform "
                              "mean; drop the weights or the EMA decay")
        output = into if output is None else output
    if output is None and not dry_run:
        raise OptionError("output", "missing: pass an output path (.safetensors, .pt or a folder)")
    output = local_path(os.fspath(output)) if output is not None else None
    kind = output_kind(output, shard_size, dcp) if output is not None and sweep is None \
        else None  # before reading
    if resume and kind not in ("sharded", "dcp"):
        raise OptionError("resume", "finishes a folder output (safetensors shards or --dcp); "
                          "a file is written in one go: run again without --resume")
    check_options(accumulate, dtype)
    method: Method = ("ema" if ema is not None else "weighted" if weights is not None
                      else "profile" if prof is not None else "uniform")
    selection, reading = Selection.of(selection), Reading.of(reading)
    if sweep is not None:
        from ckptavg.engine import sweep as sweeps

        for name, value in (("into", into), ("resume", resume), ("dcp", dcp)):
            if value:
                raise OptionError(("sweep", name), "a sweep writes new outputs, one per window; "
                                  "drop one of them")
        parsed = sweeps.parse(sweep)
        if output is None and not dry_run:
            raise OptionError("output", "missing: a sweep writes one output per window into a "
                              "folder (-o DIR) or a name template (-o 'w{last}.safetensors')")
        req = Request(tuple(os.fspath(p) for p in inputs), output, None, method,
                      None if weights is None else tuple(weights), ema, prof, selection,
                      reading, accumulate, dtype, allow_nonfinite, hash_inputs, dry_run,
                      threads)
        return sweeps.average_sweep(req, parsed, shard_size, progress)
    if world_size() > 1:
        if into is not None:
            raise OptionError("into", "folding into a running average runs in one process; "
                              "run it without torchrun")
        if not dry_run and kind not in ("sharded", "dcp"):
            raise OptionError("output", "under torchrun each rank writes one shard, so the output "
                              "is a folder; give a folder name (-o OUT_DIR)", output)
        with Group() as group:
            req = Request(tuple(os.fspath(p) for p in inputs), output, kind, method,
                          None if weights is None else tuple(weights), ema, prof, selection,
                          reading, accumulate, dtype, allow_nonfinite, hash_inputs, dry_run,
                          threads, resume)
            result = average_ranks(group, req, progress)
        result.seconds = time.perf_counter() - t0
        result.peak_rss_bytes = peak_rss_bytes()
        return result

    with contextlib.ExitStack() as stack:
        locked = stack.enter_context(exclusive_lock(into)) if into is not None else None
        opened = open_candidates([os.fspath(p) for p in inputs], reading.key, reading.strip_prefix)
        stack.callback(close_all, opened)
        cands, left_out = leave_out_outputs(opened, locked.identity if locked else None)
        # the running average alone among the inputs: nothing to fold (said below)
        chosen = select(cands, selection) if cands or locked is None else []
        skipped: list[str] = []
        running, prior, n0 = None, None, 0
        if locked is not None:
            running = stack.enter_context(open_checkpoint(into))
            if os.path.isfile(into) and running.files[0].identity != locked.identity:
                raise CkptavgError(f"{into}: was replaced while being locked; run again")
            n0, prior = _running_n(running)
            chosen, skipped = _not_yet_folded(chosen, prior, into)
            if not chosen:
                done = nothing_to_fold(into, n0, skipped, dry_run, t0)
                done.warnings[:0] = left_out
                return done
        raw = chosen_weights(chosen, method, weights, ema, prof, selection.given_order)
        readers, n_total = [c.reader for c in chosen], len(chosen)
        if running is not None:
            readers, raw, n_total = [running] + readers, [float(n0)] + raw, n0 + len(chosen)
            refuse_shared_files(readers)  # the inputs among themselves: open_candidates
        in_place = into is not None and _same(into, output)
        # Every input opened (chosen, left out by the selection or as an output of ours)
        # and the running average, unless it is rewritten in place.
        rerun = _earlier_output(output, opened, cands) if output is not None else None
        protected = [f for f in files_of(opened)
                     if not (in_place and f.identity == locked.identity)
                     and f.identity != rerun]
        if running is not None and not in_place:
            protected += running.files
        if output is not None:  # before hashing or reading any tensor
            check_output(output, kind, protected)
        # Content hashes are taken in the read pass and filled into a local output's
        # metadata before its commit (engine/content.py); a remote output records each
        # input's identity and fingerprint.
        content = kind in ("safetensors", "torch", "sharded", "dcp") and not dry_run \
            and not is_remote(output)
        plan = make_plan(readers, raw, method=method, n_total=n_total, prior_inputs=prior,
                         accumulate=accumulate, dtype=dtype, allow_nonfinite=allow_nonfinite,
                         hash_inputs=hash_inputs and not dry_run, profile=spec, content=content)
        record_recipe(plan, [c.path for c in chosen], reading, output, dtype,
                      running=running is not None)
        result = make_result(plan, chosen, into, output, method, n_total, dry_run, spec,
                             order_basis(chosen, selection.given_order))
        result.skipped = skipped
        result.warnings = left_out + [f"{p}: already folded into {into} (recorded in its "
                           "average.inputs); skipped" for p in skipped] + mixed_runs(chosen) \
            + [f"{r.path}: {n}" for r in readers for n in r.read_notes]
        if n_total == 1:
            result.warnings.append(f"{chosen[0].path}: the only input, so the output is a copy "
                                   "of it (with ckptavg's metadata), not an average; select "
                                   "two or more inputs")
        if kind == "torch" and not output.lower().endswith(".bin"):
            result.warnings += carried_notes(readers[-1])
        if plan.fp8 is not None and not plan.dequantize and plan.fp8.activations:
            result.warnings.append(
                f"{len(plan.fp8.activations)} activation scale(s) ({plan.fp8.activations[0]}"
                f"{', ...' if len(plan.fp8.activations) > 1 else ''}) are statistics of the "
                "inputs' activations, not weights: the output keeps the largest of the "
                "inputs' values; recalibrate them on the average for the best accuracy")
        if dry_run:  # the read pass without the output: what the real run would refuse
            hashes = ContentHashes.of_plan(plan)
            execute(plan, Discard(), progress=progress, threads=threads, hashes=hashes)
            for r in readers:
                r.check_unchanged()
            digests = (hashes.hexdigests() or [])[1 if running is not None else 0:]
            refuse_same_tensors([c.path for c in chosen], digests,
                                [(c.epoch, c.step) for c in chosen])
            result.content = digests
        else:
            side, notes = side_files(readers) if kind == "sharded" else ({}, [])
            if plan.dequantize and "config.json" in side:
                side["config.json"] = without_quantization(side["config.json"])
            result.warnings += notes
            entry = dcp_entry(readers[-1]) if dcp else plan.entry
            run = describe(readers, plan.specs, plan.metadata) \
                if kind in ("sharded", "dcp") and not is_remote(output) else None
            writer = make_writer(output, plan.specs, plan.metadata, shard_size, plan.ties,
                                 inputs=protected, entry=entry, extras=plan.extras,
                                 side_files=side, dcp=dcp, run=run, resume=resume)
            hashes = ContentHashes.of_plan(plan) if content and writer.fills_metadata else None
            if hashes is not None and run is not None:
                writer.hashes = hashes  # each finished shard records its digests
            try:
                with writer:
                    keys = writer.pending_keys() if run is not None else None
                    execute(plan, writer, keys, progress=progress, threads=threads,
                            hashes=hashes)
                    for r in readers:
                        r.check_unchanged()
                    if hashes is not None:
                        _fill_content(writer, hashes, chosen, running is not None, result)
            except CkptavgError as e:
                raise with_kept(e, writer.kept) from None
            result.warnings += writer.notes
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _fill_content(writer, hashes: ContentHashes, chosen: list[Candidate], running: bool,
                  result: AverageResult) -> None:
    """The content hashes into the output's metadata (and the result), after refusing two
    inputs that hold the same tensors. A resumed folder output takes the digests of its
    earlier shards from their records; where those hold none, the entries go without."""
    digests = hashes.hexdigests(writer.recorded())
    if digests is None:
        writer.fill({placeholder(i): None for i in range(len(chosen))})
        return
    digests = digests[1 if running else 0:]
    refuse_same_tensors([c.path for c in chosen], digests, [(c.epoch, c.step) for c in chosen])
    writer.fill({placeholder(i): d for i, d in enumerate(digests)})
    result.content = digests


def _earlier_output(output: str, opened: list[Candidate], kept: list[Candidate]):
    """The identity of the output file when it is an earlier output of ckptavg that the
    inputs' glob caught and that was left out as such: the same command run again replaces
    it, as it would have written it (the file is ours, and not an input of this run)."""
    if is_remote(output):
        return None
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


def _check_remote(url: str, into, resume: bool, dcp: bool) -> None:
    """What a remote output cannot be: it is streamed once, whole, by one process."""
    for name, value in (("into", into), ("resume", resume)):
        if value:
            raise OptionError((name, "output"), "work on local files; a remote output is "
                              "written once, whole: average into a local path first")
    if dcp or world_size() > 1:
        raise OptionError("output", "a remote output is written by one process as "
                          "safetensors, a torch file or a folder of safetensors shards; under "
                          "torchrun or with --dcp, write a local folder and copy it", url)
