"""Which inputs, in which order: globs, open once, no file twice, epochs, windows, cycle ends.

`open_candidates` opens every input once and keeps it open for the run; an input is never
opened again. Two inputs that share a file (the same path twice, a hard link, a symlink, a
shard of a folder given as well) are refused, naming both.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from ckptavg.errors import CkptavgError
from ckptavg.io import ReaderBase, open_checkpoint

_NUMBER = re.compile(r"(\d+)")


def _meta_int(meta: dict[str, str], key: str) -> int | None:
    v = meta.get(key)
    return int(v) if v is not None and v.lstrip("-").isdigit() else None


@dataclass
class Candidate:
    """One open input and what it says of its place in training."""

    path: str
    reader: ReaderBase

    @property
    def metadata(self) -> dict[str, str]:
        return self.reader.metadata()

    @property
    def epoch(self) -> int | None:
        return self.epoch_and_source[0]

    @property
    def epoch_and_source(self) -> tuple[int | None, str]:
        """(epoch, where it came from: 'metadata', 'name' or 'unknown')."""
        value = _meta_int(self.metadata, "train.epoch")
        if value is not None:
            return value, "metadata"
        numbers = _NUMBER.findall(os.path.basename(self.path.rstrip(os.sep)))
        return (int(numbers[-1]), "name") if numbers else (None, "unknown")

    @property
    def cycle_end(self) -> bool:
        return self.metadata.get("train.cycle_end", "").lower() == "true"


def natural_key(path: str) -> list:
    """'epoch-10' sorts after 'epoch-9'."""
    return [int(p) if p.isdigit() else p.lower() for p in _NUMBER.split(path)]


def expand(patterns: list[str]) -> list[str]:
    """Paths as given; patterns with wildcards that are not existing paths are globbed."""
    out: list[str] = []
    for p in patterns:
        if not os.path.exists(p) and any(c in p for c in "*?["):
            matches = sorted(glob.glob(p), key=natural_key)
            if not matches:
                raise CkptavgError(f"{p}: the pattern matches no file; check the path")
            out.extend(matches)
        else:
            out.append(p)
    return out


def refuse_shared_files(readers: list[ReaderBase]) -> None:
    """Raise if two inputs consist of the same file (by device and inode)."""
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


def open_candidates(patterns: list[str], key: str | None = None,
                    strip_prefix: str | None = None) -> list[Candidate]:
    """Expand globs and open every input once; on any error, everything opened is closed."""
    paths = expand(patterns)
    if not paths:
        raise CkptavgError("no input checkpoints given")
    cands: list[Candidate] = []
    try:
        for p in paths:
            cands.append(Candidate(p, open_checkpoint(p, key=key, strip_prefix=strip_prefix)))
        refuse_shared_files([c.reader for c in cands])
    except BaseException:
        close_all(cands)
        raise
    return cands


def close_all(cands: list[Candidate]) -> None:
    for c in cands:
        c.reader.close()


def order(cands: list[Candidate]) -> list[Candidate]:
    """By (train.epoch, train.step) when every input has them, else by the numbers in names."""
    if cands and all(_meta_int(c.metadata, "train.epoch") is not None
                     or _meta_int(c.metadata, "train.step") is not None for c in cands):
        return sorted(cands, key=lambda c: (_meta_int(c.metadata, "train.epoch") or 0,
                                            _meta_int(c.metadata, "train.step") or 0,
                                            natural_key(c.path)))
    return sorted(cands, key=lambda c: natural_key(c.path))


def select(cands: list[Candidate], from_epoch: int | None = None, to_epoch: int | None = None,
           cycle_ends: bool = False, every: int | None = None,
           last: int | None = None) -> list[Candidate]:
    """Apply, in this order: epoch window, cycle ends, every K-th (from the first), last N."""
    out = order(cands)
    if from_epoch is not None or to_epoch is not None:
        missing = [c.path for c in out if c.epoch is None]
        if missing:
            raise CkptavgError(
                f"{missing[0]}: epoch unknown (no train.epoch metadata, no number in the name); "
                "drop the epoch window or rename the files"
            )
        lo = from_epoch if from_epoch is not None else -(10**18)
        hi = to_epoch if to_epoch is not None else 10**18
        out = [c for c in out if lo <= c.epoch <= hi]
    if cycle_ends:
        if not any("train.cycle_end" in c.metadata for c in out):
            raise CkptavgError(
                "cycle ends asked for, but no input carries train.cycle_end metadata; "
                "save with ckptavg train --save cycle-end, or select every K-th input"
            )
        out = [c for c in out if c.cycle_end]
    if every is not None:
        if every < 1:
            raise CkptavgError(f"every {every}: must be 1 or more")
        out = out[::every]
    if last is not None:
        if last < 1:
            raise CkptavgError(f"last {last}: must be 1 or more")
        out = out[-last:]
    if not out:
        raise CkptavgError(
            f"no input left after selection (from {len(cands)} given); widen the epoch window "
            "or --last, or check the files' epochs with ckptavg inspect"
        )
    return out
