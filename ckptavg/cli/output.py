"""How results reach the user: progress bars on a terminal, text lines, JSON, warnings."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

import click


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Bar:
    """A progress callback `(done, total)` over tqdm; `describe(text)` names the current step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, done: int, total: int) -> None:
        bar = self.bar
        if done < bar.n:  # a new pass (the next epoch): start the bar again
            bar.reset(total=total)
        elif bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)


class _NoBar:
    def __call__(self, done: int, total: int) -> None:
        return None

    def describe(self, text: str) -> None:
        return None


@contextmanager
def progress_bar(quiet: bool, desc: str, unit: str = "B"):
    """A `_Bar` drawing tqdm on stderr when it is a terminal (nothing otherwise)."""
    if quiet or not sys.stderr.isatty():  # no bar: not even tqdm's import
        yield _NoBar()
        return
    from tqdm import tqdm

    disable = False
    scale = unit == "B"
    bar = tqdm(total=None, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
               disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield _Bar(bar)
    finally:
        bar.close()


def say(message: str) -> None:
    """A line on stderr that does not break an active progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _clean(obj):
    """`obj` with every float rounded to 15 significant digits: the noise of binary
    arithmetic goes (81.89999999999999 is 81.9, 4.999999999999999 is 5.0), every figure a
    float64 computation can vouch for stays."""
    if isinstance(obj, float):
        return float(f"{obj:.15g}")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """Print `obj` as JSON (floats without binary noise, see `_clean`). The units of each
    figure are in docs/json.md: accuracies in percent, losses in nats, sizes in bytes."""
    click.echo(json.dumps(_clean(obj), indent=2, default=str))


def reports() -> bool:
    """Whether this process prints the result: under torchrun only rank 0 does."""
    return os.environ.get("RANK", "0") == "0"


def emit(result, as_json: bool, quiet: bool, text) -> None:
    """Print a result: its JSON, or `text(result)` lines unless quiet. Warnings go to stderr
    unless quiet (they are in the JSON too)."""
    for w in [] if quiet else getattr(result, "warnings", []):
        click.echo(f"ckptavg: warning: {w}", err=True)
    if as_json:
        emit_json(result.to_dict())
    elif not quiet:
        for line in text(result):
            click.echo(line)
