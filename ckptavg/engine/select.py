"""Which inputs, in which order: globs, open once, no file twice, epochs, windows, cycle ends.

`open_candidates` opens every input once and keeps it open for the run; an input is never
opened again. Two inputs that share a file (the same path twice, a hard link, a symlink, a
shard of a folder given as well) or hold the same bytes (a copy) are refused, naming both.

Where a checkpoint was saved in training is read, per number, from the most trusted source
that has it: ckptavg's metadata (`train.epoch`, `train.step`), then what the training library
wrote into the checkpoint (Lightning's `epoch`/`global_step`, timm's `epoch`, fairseq's
iterator epoch and update count, a Hugging Face `trainer_state.json`), then the name
(`epoch=3`, `step-500`, a Hugging Face `checkpoint-500` folder is a step; another lone number
is taken as the epoch). A step is never taken for an epoch.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io import ReaderBase, open_checkpoint
from ckptavg.io.files import same_content
from ckptavg.io.metadata import Position, meta_int
from ckptavg.io.sources import expand, natural_key, open_all
from ckptavg.options import Selection, count

# ASCII digits only: `\d` would take other scripts' digits, and str.isdigit `²`, which int() refuses
_NUMBER = re.compile(r"([0-9]+)")
_EPOCH_IN_NAME = re.compile(r"(?:^|[^a-z])(?:epoch|ep)[=_-]?([0-9]+)", re.IGNORECASE)
_STEP_IN_NAME = re.compile(r"(?:^|[^a-z])(?:step|global_step|iter|iteration|update)[=_-]?([0-9]+)",
                           re.IGNORECASE)
_HF_CHECKPOINT = re.compile(r"^checkpoint-([0-9]+)$")


def name_position(path: str) -> Position:
    """Epoch and step as the name states them. A Hugging Face `checkpoint-N` folder is step N;
    a lone number (epoch-free, step-free) is taken as the epoch, as in `swa_10.pt`."""
    name = os.path.basename(path.rstrip(os.sep))
    epoch = _EPOCH_IN_NAME.search(name)
    step = _STEP_IN_NAME.search(name)
    hf = _HF_CHECKPOINT.match(name) if os.path.isdir(path) else None
    e = int(epoch.group(1)) if epoch else None
    st = int(step.group(1)) if step else int(hf.group(1)) if hf else None
    if e is None and st is None:
        numbers = _NUMBER.findall(name)
        e = int(numbers[-1]) if numbers else None
        return Position(e, None, "name (its number)" if e is not None else "", "")
    return Position(e, st, "name" if e is not None else "", "name" if st is not None else "")


@dataclass
class Candidate:
    """One open input and what it says of its place in training."""

    path: str
    reader: ReaderBase

    @property
    def metadata(self) -> dict[str, str]:
        return self.reader.metadata()

    @functools.cached_property
    def position(self) -> Position:
        meta = self.metadata
        e, st = meta_int(meta, "train.epoch"), meta_int(meta, "train.step")
        t = meta_int(meta, "train.tokens")
        ours = Position(e, st, "metadata train.epoch" if e is not None else "",
                        "metadata train.step" if st is not None else "",
                        t, "metadata train.tokens" if t is not None else "")
        return ours.merged(self.reader.position()).merged(name_position(self.path))

    @property
    def epoch(self) -> int | None:
        return self.position.epoch

    @property
    def step(self) -> int | None:
        return self.position.step

    @property
    def tokens(self) -> int | None:
        return self.position.tokens

    def metric(self, name: str) -> float | None:
        """A stored score: metadata `name` (e.g. train.val_acc), else the checkpoint's
        top-level number `name` (timm's `metric`)."""
        value = self.metadata.get(name)
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return None
        return self.reader.scalars().get(name)

    @property
    def cycle_end(self) -> bool:
        return self.metadata.get("train.cycle_end", "").lower() == "true"


def refuse_shared_files(readers: list[ReaderBase]) -> None:
    """Raise if two inputs consist of the same file (by device and inode) or of the same
    bytes (a copy: equal cheap fingerprints, then confirmed byte by byte)."""
    seen: dict[tuple[int, int], tuple[int, str]] = {}
    for i, r in enumerate(readers):
        for f in r.files:
            j, other = seen.get(f.identity, (i, ""))
            if j != i:
                how = "given twice" if other == r.path else f"the same file as {other}"
                raise CkptavgError(
                    f"{r.path}: {how} (same path, hard link or symlink), so it would be "
                    "counted twice; pass each checkpoint once"
                )
            seen[f.identity] = (i, r.path)
    by_print: dict[str, ReaderBase] = {}
    for r in readers:
        fp = r.fingerprint()
        other = by_print.get(fp)
        if other is not None and same_content(other.files, r.files):
            raise CkptavgError(f"{r.path}: holds the same bytes as {other.path} (a copy), so "
                               "one checkpoint would be counted twice; pass each checkpoint once")
        by_print[fp] = r


def open_candidates(patterns: list[str], key: str | None = None,
                    strip_prefix: str | None = None) -> list[Candidate]:
    """Expand globs and open every input once; on any error, everything opened is closed.
    With object storage among several inputs they are opened several at a time
    (`io.sources.open_all`)."""
    paths = expand(patterns)
    if not paths:
        raise OptionError("inputs", "none given; name checkpoint files or glob patterns")

    def open_one(p: str) -> Candidate:
        return Candidate(p, open_checkpoint(p, key=key, strip_prefix=strip_prefix))

    def ready(c: Candidate) -> None:  # its first reads, in the opener's thread
        c.reader.fingerprint()
        c.position  # noqa: B018 (a cached property: its reads happen here)

    cands: list[Candidate] = []
    try:
        open_all(paths, open_one, cands, ready)
        refuse_shared_files([c.reader for c in cands])
    except BaseException:
        close_all(cands)
        raise
    return cands


def is_output(c: Candidate) -> bool:
    """Whether the input is an output of ckptavg (an average, a soup, a SWAG file), not a
    snapshot of training."""
    meta = c.metadata
    return "average.n" in meta or "swag.rank" in meta


def leave_out_outputs(cands: list[Candidate],
                      running: tuple[int, int] | None = None) -> tuple[list[Candidate], list[str]]:
    """Snapshots without the outputs of ckptavg found among them (`runs/*.pt` catches
    `runs/swa.pt` written by an earlier run), with a warning naming each. Inputs that are
    all outputs (averaging averages, a soup of SWA models) stay. What is left out stays open
    with the others: an output must not replace its files either (`files_of(cands)`)."""
    def is_running(c: Candidate) -> bool:
        return running is not None and running in {f.identity for f in c.reader.files}

    outputs = [c for c in cands if is_output(c) or is_running(c)]
    if not outputs or (len(outputs) == len(cands) and not any(map(is_running, outputs))):
        return cands, []
    # The running average of --into among the inputs (named, or caught by a glob) is the
    # average folded into, never an input of itself: left out, and said.
    notes = [f"{c.path}: the running average of --into among the inputs; left out (it is "
             "what the new inputs are folded into)" if is_running(c) else
             f"{c.path}: an output of ckptavg (average.n={c.metadata.get('average.n', '?')}) "
             "among the snapshots; left out (fold new snapshots into it with --into "
             f"{c.path}, or average it on its own with other averages)" for c in outputs]
    return [c for c in cands if c not in outputs], notes


def files_of(cands: list[Candidate]) -> list:
    """Every file of every input opened, chosen or not: what no output may replace."""
    return [f for c in cands for f in c.reader.files]


def close_all(cands: list[Candidate]) -> None:
    for c in cands:
        c.reader.close()


Order = str  # "tokens", "step", "epoch", "given" (as the inputs were given) or "name"


def order_basis(cands: list[Candidate], given: bool = False) -> Order:
    """What orders the inputs: "tokens" when every input records the tokens it had seen,
    else "step" when every input has one, else "epoch" when every input has one, else
    "name" (the numbers in their names); "given" with `given`."""
    if given:
        return "given"
    if cands and all(c.tokens is not None for c in cands):
        return "tokens"
    if cands and all(c.step is not None for c in cands):
        return "step"
    if cands and all(c.epoch is not None for c in cands):
        return "epoch"
    return "name"


def order(cands: list[Candidate], given: bool = False) -> list[Candidate]:
    """In training order, as `order_basis` says: by step (then epoch, name), by epoch
    (then step, name), by the numbers in the names, or as given (`given`: each glob's
    matches in natural name order)."""
    basis = order_basis(cands, given)
    if basis == "given":
        return list(cands)
    if basis == "tokens":
        return sorted(cands, key=lambda c: (c.tokens, c.step or 0, c.epoch or 0,
                                            natural_key(c.path)))
    if basis == "step":
        return sorted(cands, key=lambda c: (c.step, c.epoch or 0, natural_key(c.path)))
    if basis == "epoch":
        return sorted(cands, key=lambda c: (c.epoch, c.step or 0, natural_key(c.path)))
    return sorted(cands, key=lambda c: natural_key(c.path))


def require_order(cands: list[Candidate], options: tuple[str, ...], given: bool) -> None:
    """Refuse `options`, whose result depends on the inputs' order in training, when that
    order is not known: some input has neither an epoch nor a step, and `given_order`
    does not say that the order the inputs were given is meant."""
    if not options or len(cands) < 2 or order_basis(cands, given) != "name":
        return
    lacking = next((c for c in cands if c.epoch is None and c.step is None), None)
    if lacking is None:  # every input has one or the other: some epochs, some steps
        lacking = next(c for c in cands if c.epoch is None)
        why = f"{lacking.path} has a step but no epoch while others have no step"
    else:
        why = f"{lacking.path} has no epoch or step (no metadata, checkpoint entry or number " \
              "in its name)"
    raise OptionError(options, f"depends on the inputs' order in training, and {why}; pass "
                      "given_order to take them in the order given (globs in name order), "
                      "or name the files by epoch or step", mentions=("given_order",))


def _window(cands: list[Candidate], what: str, lo: int | None, hi: int | None) -> list[Candidate]:
    if lo is None and hi is None:
        return cands
    missing = [c for c in cands if getattr(c, what) is None]
    if missing and what == "tokens":
        raise CkptavgError(
            f"{missing[0].path}: tokens seen in training unknown (no metadata train.tokens, "
            "trainer_state.json num_input_tokens_seen or token count in the checkpoint); drop "
            "the token window, or select by step or epoch")
    if missing:
        other = "step" if what == "epoch" else "epoch"
        hint = (f" (it has a {other}, {getattr(missing[0], other)}: select by {other})"
                if getattr(missing[0], other) is not None else "")
        raise CkptavgError(
            f"{missing[0].path}: {what} unknown{hint}; no metadata, checkpoint entry or name "
            f"gives it: drop the {what} window"
        )
    names = (f"from_{what}", f"to_{what}")
    if lo is not None and hi is not None and lo > hi:
        raise OptionError(names, f"the window {lo}..{hi} is empty: the first {what} is after "
                          "the last; swap them")
    kept = [c for c in cands if (lo is None or lo <= getattr(c, what))
            and (hi is None or getattr(c, what) <= hi)]
    if cands and not kept:
        found = sorted(getattr(c, what) for c in cands)
        asked = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
        raise OptionError(tuple(n for n, v in zip(names, (lo, hi)) if v is not None),
                          f"no input in the window {asked}: the inputs' {what}s run from "
                          f"{found[0]} to {found[-1]}; pick a window within them")
    return kept


def best_by(cands: list[Candidate], n: int, metric: str, lowest: bool) -> list[Candidate]:
    """The `n` inputs with the best stored `metric` (highest, or lowest), in training order."""
    if n < 1:
        raise OptionError("best", "must be 1 or more", n)
    scores = {id(c): c.metric(metric) for c in cands}
    missing = [c.path for c in cands if scores[id(c)] is None]
    if missing:
        raise CkptavgError(f"{missing[0]}: no stored {metric!r} (neither metadata nor a number in "
                           "the checkpoint); choose another metric or drop --best")
    ranked = sorted(range(len(cands)), key=lambda i: scores[id(cands[i])], reverse=not lowest)
    keep = set(ranked[:n])
    return [c for i, c in enumerate(cands) if i in keep]


def select(cands: list[Candidate], selection: Selection | None = None) -> list[Candidate]:
    """Apply, in this order: epoch window, step window, cycle ends, every K-th (from the
    first), best N by a stored metric, last N (see `Selection`)."""
    s = Selection.of(selection)
    from_epoch, to_epoch, from_step, to_step = s.from_epoch, s.to_epoch, s.from_step, s.to_step
    cycle_ends, every, best, metric, lowest, last = (s.cycle_ends, s.every, s.best, s.metric,
                                                     s.lowest, s.last)
    out = _window(_window(order(cands, s.given_order), "epoch", from_epoch, to_epoch), "step",
                  from_step, to_step)
    out = _window(out, "tokens", None if s.from_tokens is None else count(s.from_tokens,
                                                                          "from_tokens"),
                  None if s.to_tokens is None else count(s.to_tokens, "to_tokens"))
    require_order(out, tuple(n for n, v in (("every", every), ("last", last)) if v is not None),
                  s.given_order)
    if cycle_ends:
        if not any("train.cycle_end" in c.metadata for c in out):
            raise OptionError(
                "cycle_ends", "no input carries train.cycle_end metadata; save with ckptavg "
                "train --save cycle-end, or select every K-th input (every)"
            )
        out = [c for c in out if c.cycle_end]
    if every is not None:
        if every < 1:
            raise OptionError("every", "must be 1 or more", every)
        out = out[::every]
    if best is not None:
        if metric is None:
            raise OptionError(("best", "metric"), "best N ranks by a stored score: name it "
                              "(metric, e.g. train.val_acc or timm's metric)")
        out = best_by(out, best, metric, lowest)
    if last is not None:
        if last < 1:
            raise OptionError("last", "must be 1 or more", last)
        if last > len(out):
            raise OptionError("last", f"asks for more inputs than there are ({len(out)} after "
                              "the other filters); give at most that many", last)
        out = out[-last:]
    if not out:
        raise CkptavgError(
            f"no input left after selection (from {len(cands)} given); widen the epoch window "
            "or --last, or check the files' epochs with ckptavg inspect"
        )
    return out


RUN_KEYS = ("train.seed", "train.schedule", "model.arch", "model.kwargs", "data.name")


def mixed_runs(chosen: list[Candidate]) -> list[str]:
    """A warning when the inputs record different runs (seed, schedule, model, data)."""
    out = []
    for k in RUN_KEYS:
        values = {c.metadata.get(k) for c in chosen} - {None}
        if len(values) > 1:
            out.append(f"the inputs come from different runs: {k} is "
                       f"{' / '.join(sorted(values))}; average one run's checkpoints")
    return out

