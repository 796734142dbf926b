"""The training harness: the paper's schedules, a background checkpoint saver, the loop.

`TrainConfig` (config.py) is torch-free; the rest loads torch, on first use.
"""

from __future__ import annotations

import importlib

_API = {
    "TrainConfig": "ckptavg.train.config",
    "TrainResult": "ckptavg.train.loop",
    "train": "ckptavg.train.loop",
    "CheckpointSaver": "ckptavg.train.saver",
    "cyclic_lr": "ckptavg.train.schedules",
    "epoch_lr": "ckptavg.train.schedules",
    "sgd_lr": "ckptavg.train.schedules",
    "swa_lr_at": "ckptavg.train.schedules",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptavg.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
