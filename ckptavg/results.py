"""The base of every typed result the API returns (torch-free)."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

#: A progress callback: `progress(done, total)`, in the unit the caller names.
Progress = Callable[[int, int], None]


@dataclass
class Result:
    """A command's outcome: fields for Python callers, `to_dict()` for `--json`."""

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """Maximum resident set size of this process so far: Linux's VmHWM, the high-water mark
    of this program's own memory (getrusage's ru_maxrss survives exec, so a process started
    from a large parent would report the parent's peak); elsewhere ru_maxrss (KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MeanStd(Result):
    """Seeds' figures: their mean, sample standard deviation (0 for one value), and values."""

    mean: float
    std: float
    values: list[float]


def mean_std(values: list[float]) -> MeanStd:
    """The mean and sample standard deviation of seeds' figures (`MeanStd`)."""
    return MeanStd(statistics.fmean(values),
                   statistics.stdev(values) if len(values) > 1 else 0.0, list(values))
