"""Numbers and metadata read from untrusted files: ASCII integers only (`ascii_int`,
`meta_int`, `whole_number`), metadata cleaned to `str -> str` within a budget
(`clean_metadata`), and where a checkpoint sits in training (`Position`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def meta_int(meta: dict[str, str], key: str, minimum: int | None = None) -> int | None:
    """The integer a metadata entry holds (signed decimal digits), else None; with
    `minimum`, a smaller value counts as absent (a count of images cannot be negative).

    Example:
        >>> meta_int({"train.epoch": "12"}, "train.epoch"), meta_int({"x": "-3"}, "x", minimum=0)
        (12, None)
    """
    v = meta.get(key)
    n = ascii_int(v) if isinstance(v, str) else None
    return None if n is None or (minimum is not None and n < minimum) else n


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,4000}")


def ascii_int(text: str) -> int | None:
    """The integer `text` spells in ASCII decimal digits (an optional sign, surrounding blanks
    allowed), exactly, however large; None for anything else (`²`, `٣`, `1e3`, `1_000`)."""
    text = text.strip()
    return int(text) if _ASCII_INT.fullmatch(text) else None


def clean_metadata(meta: object, notes: list[str] | None = None) -> dict[str, str]:
    """Keep a metadata map only if it is a dict; str keys, values JSON-encoded unless str.
    A value past the budget of an untrusted entry (io/pickles.within_budget: what it expands
    to, its depth, a cycle) is left out, with a note naming it in `notes`."""
    from ckptavg.io.pickles import within_budget

    if not isinstance(meta, dict):
        return {}
    out = {}
    for k, v in meta.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, str):
            out[k] = v
            continue
        over = within_budget(v)
        if over is None:
            try:
                out[k] = json.dumps(v, default=str)
                continue
            except (ValueError, RecursionError, TypeError) as e:
                over = f"cannot be written as JSON ({e})"
        if notes is not None:
            notes.append(f"metadata entry {k!r} {over}: left out")
    return out


@dataclass(frozen=True)
class Position:
    """Where in training a checkpoint was saved, and where each number was read."""

    epoch: int | None = None
    step: int | None = None
    epoch_from: str = ""
    step_from: str = ""
    tokens: int | None = None  # tokens consumed in training when the checkpoint was saved
    tokens_from: str = ""

    def merged(self, later: Position) -> Position:
        """Fill what this one lacks from `later` (a less trusted source)."""
        e, ef = (self.epoch, self.epoch_from) if self.epoch is not None else (later.epoch, later.epoch_from)
        s, sf = (self.step, self.step_from) if self.step is not None else (later.step, later.step_from)
        t, tf = (self.tokens, self.tokens_from) if self.tokens is not None \
            else (later.tokens, later.tokens_from)
        return Position(e, s, ef, sf, t, tf)


def whole_number(value: object) -> int | None:
    """An int from an int (not a bool) or an integral float; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
