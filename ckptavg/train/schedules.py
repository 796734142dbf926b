"""The SWA paper's learning-rate schedules, as in its authors' code.

Per-epoch schedules are set once per epoch from the 0-based epoch index:
`lr = lr_init * f(t)` with `f = 1` for `t <= 0.5`, `1 - (1 - r)(t - 0.5)/0.4` for
`t <= 0.9`, and `r` after; SGD: `t = epoch/epochs`, `r = 0.01`; SWA: `t = epoch/swa_start`,
`r = swa_lr/lr_init` (so the rate reaches swa_lr at 0.9 swa_start and stays there).
The cyclical schedule (paper, section 3.2) is set per iteration within each cycle of `c`
iterations: `alpha(i) = (1 - t) alpha1 + t alpha2`, `t = (mod(i - 1, c) + 1)/c`.
"""

from __future__ import annotations


def _factor(t: float, r: float) -> float:
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - r) * (t - 0.5) / 0.4
    return r


def sgd_lr(epoch: int, lr_init: float, epochs: int) -> float:
    """The SGD baseline's rate for 0-based `epoch` of a run of `epochs` epochs."""
    return lr_init * _factor(epoch / epochs, 0.01)


def swa_lr_at(epoch: int, lr_init: float, swa_start: int, swa_lr: float) -> float:
    """The SWA run's rate for 0-based `epoch`: decays to swa_lr, constant from 0.9 swa_start."""
    return lr_init * _factor(epoch / swa_start, swa_lr / lr_init)


def cyclic_lr(i: int, c: int, alpha1: float, alpha2: float) -> float:
    """The rate at 1-based iteration `i` of cycles of `c` iterations: alpha1 -> alpha2."""
    t = ((i - 1) % c + 1) / c
    return (1 - t) * alpha1 + t * alpha2


def epoch_lr(epoch: int, *, schedule: str, lr_init: float, epochs: int,
             swa_start: int | None = None, swa_lr: float | None = None) -> float:
    """The per-epoch rate of `schedule` ('sgd' or 'swa')."""
    if schedule == "sgd":
        return sgd_lr(epoch, lr_init, epochs)
    if schedule == "swa":
        if swa_start is None or swa_lr is None:
            raise ValueError("the swa schedule needs swa_start and swa_lr")
        return swa_lr_at(epoch, lr_init, swa_start, swa_lr)
    raise ValueError(f"unknown schedule {schedule!r}")
