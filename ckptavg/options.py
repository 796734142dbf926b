"""The options shared by the API and the CLI: their allowed values and defaults, declared once.

This module does not import torch, so the CLI can build its `--help` from it. A library
function takes its defaults from here; the CLI shows the same values.
"""

from __future__ import annotations

from typing import Literal, get_args

Split = Literal["train", "test"]
Stats = Literal["update_bn", "exact"]
Schedule = Literal["sgd", "swa"]
Anneal = Literal["linear", "cos"]
SaveWhat = Literal["epoch", "cycle-end", "none"]
Accumulate = Literal["float64", "float32"]
OutDtype = Literal["float32", "bfloat16", "float16", "float64"]
Method = Literal["uniform", "weighted", "ema", "profile"]

DEVICE = "auto"  # auto, cpu, cuda, cuda:N
EVAL_BATCH_SIZE = 256  # evaluate, ensemble, width, bn-fix
TRAIN_BATCH_SIZE = 128
WORKERS = 0
SEED = 0
ACCUMULATE: Accumulate = "float64"
STATS: Stats = "update_bn"
SWAG_RANK = 20  # K, as the SWAG authors
SWAG_SAMPLES = 30
SWAG_SCALE = 0.5
AVERAGE_THREADS = None  # threads for average's arithmetic; None: the idle cores less one


def choices(literal) -> list[str]:
    """The values of a Literal type, in order: `choices(Split) == ["train", "test"]`."""
    return list(get_args(literal))


def check_choice(name: str, value, literal) -> None:
    """Raise a CkptavgError when `value` is not one of `literal`'s values."""
    allowed = choices(literal)
    if value not in allowed:
        from ckptavg.errors import OptionError

        raise OptionError(name, f"use one of {', '.join(allowed)}", repr(value))
