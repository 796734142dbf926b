"""The base of every typed result the API returns (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Result:
    """A command's outcome: fields for Python callers, `to_dict()` for `--json`."""

    def to_dict(self) -> dict:
        return asdict(self)
