"""The base of every typed result the API returns (torch-free)."""

from __future__ import annotations

import resource
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
    """Maximum resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
