"""ckptavg: Stochastic Weight Averaging done offline.

Save a checkpoint per epoch, stream any set of them into one average, recalibrate
BatchNorm, evaluate. Importing this package does not import torch: the API functions load
their modules on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "average": "ckptavg.averaging",
    "AverageResult": "ckptavg.averaging",
    "method_weights": "ckptavg.averaging",
    "load": "ckptavg.checkpoint",
    "save": "ckptavg.checkpoint",
    "inspect": "ckptavg.checkpoint",
    "open_checkpoint": "ckptavg.io",
    "bn_fix": "ckptavg.bn",
    "evaluate": "ckptavg.evaluation",
    "create_model": "ckptavg.models",
    "list_models": "ckptavg.models",
    "register_model": "ckptavg.models",
    "CkptavgError": "ckptavg.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
