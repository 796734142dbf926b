"""`verify`: re-derive an output of `average` from the recipe in its metadata and say, bit
for bit, whether it is what its recorded inputs give.

`average` records in each output the inputs' paths relative to the output
(`average.recipe`), the weights exactly as applied, the precision and dtype, and each
input's identity, fingerprint and content hash (`average.inputs`). `verify` finds each
input (where the recipe says, or among the files given to it, by name), runs the same plan
through the same kernel into a writer that compares every byte with the output instead of
writing it, and checks each input's content hash, taken in the same read, against the one
recorded. Nothing is written.

Exit codes (`VerifyResult.exit_code`): 0 verified; 1 the output differs from what its
inputs give; 3 an input is missing or is not the file that was averaged; 4 the output has
no recipe (not written by `average` of this version, or a running average: `--into`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptavg.engine.content import ContentHashes
from ckptavg.engine.kernel import execute
from ckptavg.engine.plan import make_plan
from ckptavg.engine.select import Candidate, close_all, open_candidates
from ckptavg.errors import CkptavgError
from ckptavg.io import open_checkpoint
from ckptavg.io.files import pread_extent
from ckptavg.io.sources import expand
from ckptavg.io.writer import Writer, as_array
from ckptavg.results import Progress, Result, peak_rss_bytes

EXIT = {"verified": 0, "differs": 1, "inputs-changed": 3, "no-recipe": 4}
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
SHOWN = 5


@dataclass
class VerifyResult(Result):
    """What `verify` found: `status` is "verified", "differs", "inputs-changed" or
    "no-recipe"; `problems` says why, one line each."""

    output: str
    status: str
    inputs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tensors: int = 0  # tensors compared
    differing: list[str] = field(default_factory=list)  # names of tensors that differ
    skipped: list[str] = field(default_factory=list)  # not compared (bn-fix's statistics)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT[self.status]

    def to_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


class Compare(Writer):
    """Takes the re-derived tensors and compares each byte with the output's own."""

    path = "(verify: nothing written)"
    streams_parts = True

    def __init__(self, output, skip: set[str]):
        self.output, self.skip = output, skip
        self.differing: list[str] = []
        self.compared = 0
        self._at: dict[str, int] = {}

    def _theirs(self, key: str, start: int, n: int) -> np.ndarray:
        if n == 0:
            return np.empty(0, np.uint8)
        ext = self.output.locate(key)
        if ext is not None:
            buf = np.empty(n, np.uint8)
            pread_extent(ext, memoryview(buf), start)
            return buf
        whole = as_array(self.output.read(key)).reshape(-1).view(np.uint8)
        return whole[start:start + n]

    def _check(self, key: str, data: np.ndarray, start: int) -> None:
        if key in self.skip or key in self.differing:
            return
        mine = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if not np.array_equal(mine, self._theirs(key, start, mine.size)):
            self.differing.append(key)

    def _write(self, key: str, tensor: np.ndarray) -> None:
        self.compared += 1
        self._check(key, tensor, 0)

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        start = 0 if first else self._at[key]
        self._check(key, flat, start)
        self._at[key] = start + flat.nbytes
        if last:
            self.compared += 1
            del self._at[key]

    def _close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _find(recorded: str, output: str, given: dict[str, list[str]]) -> str | None:
    """Where a recorded input is now: among the files given to verify (by name), else
    where the recipe says, relative to the output's folder (or its URL)."""
    name = os.path.basename(recorded.rstrip("/"))
    if name in given:
        return given[name][0]
    if "://" in recorded:
        return recorded
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(output)), recorded))
    return path if os.path.exists(path) else None


def verify(output: str | os.PathLike, inputs: list[str] | None = None,
           progress: Progress | None = None) -> VerifyResult:
    """Re-derive `output` from the recipe and inputs recorded in its metadata and compare.

    Args:
        output: an output of `ckptavg average` (any format it writes).
        inputs: files or globs where the inputs are now, when they moved: each is matched
            to a recorded input by its file name. Default: where the recipe says, relative
            to the output.
        progress: called with (bytes read, bytes to read).

    Returns:
        A `VerifyResult`; its `status` and `exit_code` say whether the output is bit for bit
        what its inputs give (see the module docstring).

    Example:
        >>> ckptavg.verify("swa.safetensors").status
        'verified'
    """
    t0 = time.perf_counter()
    output = os.fspath(output)
    given: dict[str, list[str]] = {}
    for p in expand(list(inputs or [])):
        given.setdefault(os.path.basename(p.rstrip("/")), []).append(p)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open_checkpoint(output))
        meta = out.metadata()
        result = VerifyResult(output, "verified")
        recipe = _recipe(meta)
        if recipe is None:
            result.status = "no-recipe"
            result.problems.append(
                f"{output}: no average.recipe in its metadata, so it cannot be re-derived "
                "(written by another tool or an older ckptavg, or folded with --into, "
                "whose earlier average a later fold replaced)")
            return _done(result, t0)
        entries = json.loads(meta.get("average.inputs", "[]"))
        paths = []
        for recorded in recipe["inputs"]:
            found = _find(recorded, output, given)
            if found is None:
                result.problems.append(f"{recorded}: missing (recorded relative to {output}); "
                                       "pass where it is now: ckptavg verify OUT FILES...")
            paths.append(found)
        result.inputs = [p for p in paths if p is not None]
        if len(entries) != len(paths):
            raise CkptavgError(f"{output}: its average.inputs and average.recipe disagree "
                               f"({len(entries)} and {len(paths)} inputs): the metadata was "
                               "edited; it cannot be verified")
        if result.problems:
            result.status = "inputs-changed"
            return _done(result, t0)
        opened = open_candidates(paths, recipe.get("key"), recipe.get("strip_prefix"))
        stack.callback(close_all, opened)
        readers = [c.reader for c in opened]
        for c, e in zip(opened, entries):
            if isinstance(e, dict) and e.get("fingerprint") not in (None, c.reader.fingerprint()):
                result.problems.append(f"{c.path}: not the file that was averaged (its "
                                       "sampled bytes differ from the recorded fingerprint)")
        if result.problems:
            result.status = "inputs-changed"
            return _done(result, t0)
        _compare(result, out, meta, recipe, readers, opened, entries, progress)
    return _done(result, t0)


def _recipe(meta: dict[str, str]) -> dict | None:
    try:
        recipe = json.loads(meta["average.recipe"])
    except (KeyError, ValueError):
        return None
    ok = isinstance(recipe, dict) and isinstance(recipe.get("inputs"), list) \
        and isinstance(recipe.get("weights"), list) \
        and len(recipe["weights"]) == len(recipe["inputs"]) \
        and all(isinstance(p, str) for p in recipe["inputs"])
    return recipe if ok else None


def _compare(result: VerifyResult, out, meta: dict[str, str], recipe: dict, readers,
             opened: list[Candidate], entries: list, progress) -> None:
    plan = make_plan(readers, [float(w) for w in recipe["weights"]],
                     accumulate=recipe.get("accumulate", "float64"), dtype=recipe.get("dtype"),
                     allow_nonfinite=bool(recipe.get("allow_nonfinite")))
    theirs = {k: out.info(k) for k in out.keys()}
    mine = {s.key: s for s in plan.specs}
    for k in sorted(set(theirs) ^ set(mine))[:SHOWN]:
        where = "the output" if k in theirs else "the re-derived average"
        result.differing.append(k)
        result.problems.append(f"{k}: only in {where}")
    for k in sorted(set(theirs) & set(mine)):
        a, b = theirs[k], mine[k]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            result.differing.append(k)
            result.problems.append(f"{k}: {a.dtype.name} {list(a.shape)} in the output, "
                                   f"{b.dtype.name} {list(b.shape)} re-derived")
    skip = set(result.differing)
    if meta.get("bn.samples") is not None:  # recalibrated by bn-fix after averaging
        result.skipped = [k for k in mine if k.endswith(BN_STATS)]
        skip |= set(result.skipped)
    compare = Compare(out, skip)
    hashes = ContentHashes.of_plan(plan)
    with compare:
        execute(plan, compare, [k for k in mine if k in theirs], progress=progress,
                hashes=hashes)
    for r in readers:
        r.check_unchanged()
    result.tensors = compare.compared
    digests = hashes.hexdigests() or []
    changed = [c.path for c, e, d in zip(opened, entries, digests)
               if isinstance(e, dict) and isinstance(e.get("content"), str)
               and e["content"] != d]
    if changed:  # what they give now is not what was averaged: nothing more to compare
        result.problems += [f"{p}: not the file that was averaged (its tensors' content "
                            "hash differs from the recorded one)" for p in changed]
        result.status = "inputs-changed"
        return
    result.differing += compare.differing
    if compare.differing:
        names = ", ".join(compare.differing[:SHOWN])
        more = f" and {len(compare.differing) - SHOWN} more" if len(compare.differing) > SHOWN else ""
        result.problems.append(f"{len(compare.differing)} tensor(s) differ from what the "
                               f"inputs give: {names}{more}")
    if result.differing:
        result.status = "differs"


def _done(result: VerifyResult, t0: float) -> VerifyResult:
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result
