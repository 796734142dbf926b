"""Model registry: `@register_model` factories, `create_model(name, **kwargs)`.

Names are registry names (`preresnet164`), `torchvision:NAME` (torchvision's builders) or
`package.module:factory` (a user's own network). Factories take `num_classes` and
`in_channels`; the data set supplies both.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable

from ckptavg.errors import ModelError

_REGISTRY: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register a factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def _load_builtins() -> None:
    if not _REGISTRY:
        importlib.import_module("ckptavg.models.cifar")


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    _load_builtins()
    doc = inspect.getdoc(_REGISTRY[name]) or ""
    return doc.splitlines()[0] if doc else ""


def _accepted(fn: Callable, kwargs: dict) -> dict:
    """Drop num_classes/in_channels where a factory does not take them."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items()
            if k in params or k not in ("num_classes", "in_channels")}


def create_model(name: str, **kwargs):
    """Build a model by name.

    Args:
        name: a registered name, `torchvision:NAME` or `package.module:factory`.
        **kwargs: passed to the factory (e.g. num_classes=10, in_channels=3).

    Returns:
        A `torch.nn.Module`.

    Example:
        >>> create_model("preresnet20", num_classes=10, in_channels=1)
    """
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            close = difflib.get_close_matches(arch, torchvision.models.list_models(), n=3)
            hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
            raise ModelError(f"unknown torchvision model {arch!r}{hint}")
        kwargs = {k: v for k, v in kwargs.items() if k != "in_channels"}
        return _call(torchvision.models.get_model, name, arch, **kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            raise ModelError(f"--model {name}: cannot import {module_name} ({e})") from None
        except AttributeError:
            raise ModelError(f"--model {name}: {module_name} has no {attr!r}") from None
        return _call(fn, name, **_accepted(fn, kwargs))
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelError(f"unknown model {name!r}; {hint}`ckptavg models` lists them")
    fn = _REGISTRY[name]
    return _call(fn, name, **_accepted(fn, kwargs))


def _call(fn: Callable, name: str, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TypeError as e:
        raise ModelError(f"model {name}: bad arguments {kwargs} ({e}); check --model-kwargs") from None


__all__ = ["create_model", "list_models", "register_model"]
