"""The SWA paper's learning-rate schedules, as in its authors' code.

Per-epoch schedules are set once per epoch from the 0-based epoch index:
`lr = lr_init * f(t)` with `f = 1` for `t <= 0.5`, `1 - (1 - r)(t - 0.5)/0.4` for
`t <= 0.9`, and `r` after; SGD: `t = epoch/epochs`, `r = 0.01`; SWA: `t = epoch/swa_start`,
`r = swa_lr/lr_init` (so the rate reaches swa_lr at 0.9 swa_start and stays there).
The cyclical schedule (paper, section 3.2) is set per iteration within each cycle of `c`
iterations: `alpha(i) = (1 - t) alpha1 + t alpha2`, `t = (mod(i - 1, c) + 1)/c`.
"""

from __future__ import annotations

import math


def _factor(t: float, r: float) -> float:
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - r) * (t - 0.5) / 0.4
    return r


def sgd_lr(epoch: int, lr_init: float, epochs: int) -> float:
    """The SGD baseline's rate for 0-based `epoch` of a run of `epochs` epochs."""
    return lr_init * _factor(epoch / epochs, 0.01)


def swa_lr_at(epoch: int, lr_init: float, swa_start: int, swa_lr: float,
              anneal_epochs: int | None = None, anneal: str = "linear") -> float:
    """The SWA run's rate for 0-based `epoch`.

    The paper's rule (default): decays to swa_lr, constant from 0.9 swa_start. With
    `anneal_epochs` N, Lightning's StochasticWeightAveraging / torch's SWALR rule instead:
    `lr_init` until the SWA phase (epochs from swa_start on, 1-based), then annealed to
    `swa_lr` over N epochs, `anneal` "linear" or "cos", and constant after."""
    if anneal_epochs is None:
        return lr_init * _factor(epoch / swa_start, swa_lr / lr_init)
    j = epoch - (swa_start - 1)  # epochs into the SWA phase
    if j <= 0:
        return lr_init
    t = min(1.0, j / max(1, anneal_epochs))
    alpha = (1 - math.cos(math.pi * t)) / 2 if anneal == "cos" else t
    return lr_init * (1 - alpha) + swa_lr * alpha


def cyclic_lr(i: int, c: int, alpha1: float, alpha2: float) -> float:
    """The rate at 1-based iteration `i` of cycles of `c` iterations: alpha1 -> alpha2."""
    t = ((i - 1) % c + 1) / c
    return (1 - t) * alpha1 + t * alpha2


def epoch_lr(epoch: int, *, schedule: str, lr_init: float, epochs: int,
             swa_start: int | None = None, swa_lr: float | None = None,
             anneal_epochs: int | None = None, anneal: str = "linear") -> float:
    """The per-epoch rate of `schedule` ('sgd' or 'swa')."""
    if schedule == "sgd":
        return sgd_lr(epoch, lr_init, epochs)
    if schedule == "swa":
        if swa_start is None or swa_lr is None:
            raise ValueError("the swa schedule needs swa_start and swa_lr")
        return swa_lr_at(epoch, lr_init, swa_start, swa_lr, anneal_epochs, anneal)
    raise ValueError(f"unknown schedule {schedule!r}")
