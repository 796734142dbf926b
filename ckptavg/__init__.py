"""ckptavg: Stochastic Weight Averaging done offline.

Save a checkpoint per epoch, stream any set of them into one average, recalibrate
BatchNorm, evaluate. Importing this package does not import torch: the API functions load
their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ckptavg.version import __version__

# name -> module; each loads on first use (and imports torch where it needs it). Training lives in
# `ckptavg.train` (train, TrainConfig, TrainResult, CheckpointSaver): a subpackage and a
# function cannot share the name `ckptavg.train`.
_API = {
    "average": "ckptavg.engine.average",
    "AverageResult": "ckptavg.engine.result",
    "verify": "ckptavg.engine.verify",
    "VerifyResult": "ckptavg.engine.verify",
    "method_weights": "ckptavg.engine.plan",
    "load": "ckptavg.io.checkpoint",
    "save": "ckptavg.io.checkpoint",
    "inspect": "ckptavg.io.checkpoint",
    "InspectResult": "ckptavg.io.checkpoint",
    "open_checkpoint": "ckptavg.io",
    "bn_fix": "ckptavg.nn.bn",
    "BnFixResult": "ckptavg.nn.bn",
    "recalibrate": "ckptavg.nn.bn",
    "evaluate": "ckptavg.nn.evaluation",
    "EvalResult": "ckptavg.nn.evaluation",
    "ensemble": "ckptavg.experiments.ensemble",
    "EnsembleResult": "ckptavg.experiments.ensemble",
    "width": "ckptavg.experiments.width",
    "WidthResult": "ckptavg.experiments.width",
    "replicate": "ckptavg.experiments.replicate",
    "ReplicateResult": "ckptavg.experiments.replicate",
    "run_demo": "ckptavg.experiments.demo",
    "soup": "ckptavg.selection.soup",
    "SoupResult": "ckptavg.selection.soup",
    "search": "ckptavg.selection.search",
    "swag": "ckptavg.selection.swag",
    "SwagResult": "ckptavg.selection.swag",
    "evaluate_swag": "ckptavg.selection.swag",
    "SwagEvalResult": "ckptavg.selection.swag",
    "SearchResult": "ckptavg.selection.search",
    "create_model": "ckptavg.nn.models",
    "list_models": "ckptavg.nn.models",
    "register_model": "ckptavg.nn.models",
    "CkptavgError": "ckptavg.errors",
    "OptionError": "ckptavg.errors",
    "search_profiles": "ckptavg.selection.profile_search",
    "Selection": "ckptavg.options",
    "Reading": "ckptavg.options",
    "ModelOptions": "ckptavg.options",
    "DataOptions": "ckptavg.options",
    "LoaderOptions": "ckptavg.options",
    "HeldOutOptions": "ckptavg.options",
    "ProfileSearchResult": "ckptavg.selection.profile_search",
}

if TYPE_CHECKING:  # the real signatures for type checkers and IDEs; never run
    from ckptavg.engine.average import average
    from ckptavg.engine.plan import method_weights
    from ckptavg.engine.result import AverageResult
    from ckptavg.engine.verify import VerifyResult, verify
    from ckptavg.errors import CkptavgError, OptionError
    from ckptavg.experiments.demo import run_demo
    from ckptavg.experiments.ensemble import EnsembleResult, ensemble
    from ckptavg.experiments.replicate import ReplicateResult, replicate
    from ckptavg.experiments.width import WidthResult, width
    from ckptavg.io import open_checkpoint
    from ckptavg.io.checkpoint import InspectResult, inspect, load, save
    from ckptavg.nn.bn import BnFixResult, bn_fix, recalibrate
    from ckptavg.nn.evaluation import EvalResult, evaluate
    from ckptavg.nn.models import create_model, list_models, register_model
    from ckptavg.options import (
        DataOptions,
        HeldOutOptions,
        LoaderOptions,
        ModelOptions,
        Reading,
        Selection,
    )
    from ckptavg.selection.profile_search import ProfileSearchResult, search_profiles
    from ckptavg.selection.search import SearchResult, search
    from ckptavg.selection.soup import SoupResult, soup
    from ckptavg.selection.swag import SwagEvalResult, SwagResult, evaluate_swag, swag

__all__ = [
    "AverageResult",
    "DataOptions",
    "HeldOutOptions",
    "LoaderOptions",
    "ModelOptions",
    "Reading",
    "Selection",
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
    "VerifyResult",
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
    "verify",
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
