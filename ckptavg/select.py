"""Which inputs, in which order: globs, natural order by epoch/step, windows, cycle ends."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from ckptavg.errors import CkptavgError

_NUMBER = re.compile(r"(\d+)")


@dataclass
class Candidate:
    """One input checkpoint and what its metadata (or name) says of its place in training."""

    path: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def epoch(self) -> int | None:
        value = self.metadata.get("train.epoch")
        if value is not None and value.lstrip("-").isdigit():
            return int(value)
        numbers = _NUMBER.findall(os.path.basename(self.path.rstrip(os.sep)))
        return int(numbers[-1]) if numbers else None

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
    seen: dict[str, str] = {}
    for p in out:
        real = os.path.realpath(p)
        if real in seen:
            raise CkptavgError(f"{p}: given twice (also as {seen[real]}); pass each checkpoint once")
        seen[real] = p
    return out


def order(cands: list[Candidate]) -> list[Candidate]:
    """By (train.epoch, train.step) when every input has them, else by the numbers in names."""

    def meta_int(c: Candidate, k: str) -> int | None:
        v = c.metadata.get(k)
        return int(v) if v is not None and v.lstrip("-").isdigit() else None

    if cands and all(meta_int(c, "train.epoch") is not None or meta_int(c, "train.step") is not None
                     for c in cands):
        return sorted(cands, key=lambda c: (meta_int(c, "train.epoch") or 0,
                                            meta_int(c, "train.step") or 0, natural_key(c.path)))
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
                "drop --from-epoch/--to-epoch or rename the files"
            )
        lo = from_epoch if from_epoch is not None else -(10**18)
        hi = to_epoch if to_epoch is not None else 10**18
        out = [c for c in out if lo <= c.epoch <= hi]
    if cycle_ends:
        if not any("train.cycle_end" in c.metadata for c in out):
            raise CkptavgError(
                "--cycle-ends: no input carries train.cycle_end metadata; "
                "save with ckptavg train --save cycle-end, or select with --every"
            )
        out = [c for c in out if c.cycle_end]
    if every is not None:
        if every < 1:
            raise CkptavgError(f"--every {every}: must be 1 or more")
        out = out[::every]
    if last is not None:
        if last < 1:
            raise CkptavgError(f"--last {last}: must be 1 or more")
        out = out[-last:]
    if not out:
        raise CkptavgError(
            f"no input left after selection (from {len(cands)} given); widen --from-epoch/"
            "--to-epoch/--last or check the files' epochs with ckptavg inspect"
        )
    return out
