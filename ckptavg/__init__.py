"""ckptavg: Stochastic Weight Averaging done offline.

Save a checkpoint per epoch, stream any set of them into one average, recalibrate
BatchNorm, evaluate. Importing this package does not import torch: the API functions load
their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module; each loads on first use (and imports torch where it needs it). Training lives in
# `ckptavg.train` (train, TrainConfig, TrainResult, CheckpointSaver): a subpackage and a
# function cannot share the name `ckptavg.train`.
_API = {
    "average": "ckptavg.averaging",
    "AverageResult": "ckptavg.averaging",
    "method_weights": "ckptavg.averaging",
    "load": "ckptavg.checkpoint",
    "save": "ckptavg.checkpoint",
    "inspect": "ckptavg.checkpoint",
    "InspectResult": "ckptavg.checkpoint",
    "open_checkpoint": "ckptavg.io",
    "bn_fix": "ckptavg.bn",
    "BnFixResult": "ckptavg.bn",
    "recalibrate": "ckptavg.bn",
    "evaluate": "ckptavg.evaluation",
    "EvalResult": "ckptavg.evaluation",
    "ensemble": "ckptavg.experiments.ensemble",
    "EnsembleResult": "ckptavg.experiments.ensemble",
    "width": "ckptavg.experiments.width",
    "WidthResult": "ckptavg.experiments.width",
    "replicate": "ckptavg.experiments.replicate",
    "ReplicateResult": "ckptavg.experiments.replicate",
    "run_demo": "ckptavg.demo",
    "soup": "ckptavg.soups",
    "SoupResult": "ckptavg.soups",
    "search": "ckptavg.windows",
    "swag": "ckptavg.posterior",
    "SwagResult": "ckptavg.posterior",
    "evaluate_swag": "ckptavg.posterior",
    "SwagEvalResult": "ckptavg.posterior",
    "SearchResult": "ckptavg.windows",
    "create_model": "ckptavg.models",
    "list_models": "ckptavg.models",
    "register_model": "ckptavg.models",
    "CkptavgError": "ckptavg.errors",
    "OptionError": "ckptavg.errors",
    "search_profiles": "ckptavg.profile_search",
    "ProfileSearchResult": "ckptavg.profile_search",
}

if TYPE_CHECKING:  # the real signatures for type checkers and IDEs; never run
    from ckptavg.averaging import AverageResult, average, method_weights
    from ckptavg.bn import BnFixResult, bn_fix, recalibrate
    from ckptavg.checkpoint import InspectResult, inspect, load, save
    from ckptavg.demo import run_demo
    from ckptavg.errors import CkptavgError, OptionError
    from ckptavg.evaluation import EvalResult, evaluate
    from ckptavg.experiments.ensemble import EnsembleResult, ensemble
    from ckptavg.experiments.replicate import ReplicateResult, replicate
    from ckptavg.experiments.width import WidthResult, width
    from ckptavg.io import open_checkpoint
    from ckptavg.models import create_model, list_models, register_model
    from ckptavg.posterior import SwagEvalResult, SwagResult, evaluate_swag, swag
    from ckptavg.profile_search import ProfileSearchResult, search_profiles
    from ckptavg.soups import SoupResult, soup
    from ckptavg.windows import SearchResult, search

__all__ = [
    "AverageResult",
    "BnFixResult",
    "CkptavgError",
    "EnsembleResult",
    "EvalResult",
    "InspectResult",
    "OptionError",
    "ProfileSearchResult",
    "ReplicateResult",
    "SearchResult",
    "SoupResult",
    "SwagEvalResult",
    "SwagResult",
    "WidthResult",
    "average",
    "bn_fix",
    "create_model",
    "ensemble",
    "evaluate",
    "evaluate_swag",
    "inspect",
    "list_models",
    "load",
    "method_weights",
    "open_checkpoint",
    "recalibrate",
    "register_model",
    "replicate",
    "run_demo",
    "save",
    "search",
    "search_profiles",
    "soup",
    "swag",
    "width",
    "__version__",
]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptavg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
