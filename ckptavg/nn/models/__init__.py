"""Model registry: `@register_model` factories, `create_model(name, **kwargs)`.

Names are registry names (`preresnet164`), `torchvision:NAME` (torchvision's builders) or
`package.module:factory` (a user's own network). Factories take `num_classes` and
`in_channels`; the data set supplies both.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable

from ckptavg.errors import ModelError

_REGISTRY: dict[str, Callable] = {}
_BUILTINS_LOADED = False
# Model zoos whose names are data, not code: safe to build from a file's metadata.
ZOOS = ("torchvision:", "timm:")


def names_code(name: str) -> bool:
    """True for `package.module:factory`, a name that would import and call code."""
    return ":" in name and not name.startswith(ZOOS)


def importable_from_cwd() -> None:
    """Put the working folder on the import path, as `python -m` does, so that a user's
    `--model mynets:build` or `--data mydata:load` in the current folder is found."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def register_model(fn: Callable) -> Callable:
    """Register a factory under its function name (a name may be registered once).

    Args:
        fn: a function returning a torch.nn.Module; it may take `num_classes` and
            `in_channels` (supplied from the data set) and any keyword arguments.

    Returns:
        `fn` itself, so this works as a decorator. The built-in models stay registered; a
        name registered twice raises ModelError.

    Example:
        >>> import torch
        >>> @register_model
        ... def my_net(num_classes=10, in_channels=3):
        ...     return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
        >>> "my_net" in list_models()
        True
    """
    _load_builtins()
    if fn.__name__ in _REGISTRY and _REGISTRY[fn.__name__] is not fn:
        raise ModelError(f"a model named {fn.__name__!r} is already registered; "
                         "give the factory another name")
    _REGISTRY[fn.__name__] = fn
    return fn


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("ckptavg.nn.models.cifar")


def list_models() -> list[str]:
    """Registered model names, sorted.

    Args:
        none.

    Returns:
        The names `create_model` accepts besides `torchvision:NAME`, `timm:NAME` and
        `package.module:factory`.

    Example:
        >>> "preresnet164" in list_models()
        True
    """
    _load_builtins()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    _load_builtins()
    doc = inspect.getdoc(_REGISTRY[name]) or ""
    return " ".join(doc.split("\n\n")[0].split())  # the first paragraph, on one line


def _accepted(fn: Callable, kwargs: dict, name: str, supplied: dict | None = None) -> dict:
    """What the factory is called with. Every argument the user gave (`kwargs`) is passed
    when the signature names it or takes **kwargs, and refused by name otherwise, before the
    call; `supplied` (num_classes/in_channels inferred from the data set) only where the
    signature names them."""
    supplied = {k: v for k, v in (supplied or {}).items() if k not in kwargs}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {**supplied, **kwargs}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not var_kw]
    if unknown:
        raise ModelError(f"model {name}: the factory takes no argument {unknown[0]!r} "
                         f"(it takes: {', '.join(params) or 'nothing'}); fix the model kwargs")
    out = {**{k: v for k, v in supplied.items() if k in params}, **kwargs}
    missing = [p.name for p in params.values() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in out]
    if missing:
        raise ModelError(f"model {name}: the factory needs the argument {missing[0]!r}; "
                         "give it in the model kwargs")
    return out


def create_model(name: str, *, supplied: dict | None = None, **kwargs):
    """Build a model by name.

    Args:
        name: a registered name, `torchvision:NAME`, `timm:NAME` (when timm is installed) or
            `package.module:factory` (imports and calls your code: pass only names you trust).
        supplied: arguments inferred by the caller (num_classes, in_channels from the data
            set), passed only where the factory's signature names them.
        **kwargs: the user's arguments (e.g. num_classes=10), each passed (also through a
            factory's **kwargs) or refused by name.

    Returns:
        A `torch.nn.Module`. An exception raised inside the factory propagates unchanged.

    Example:
        >>> net = create_model("preresnet20", num_classes=10, in_channels=1)
        >>> sum(p.numel() for p in net.parameters())
        271994
    """
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            close = difflib.get_close_matches(arch, torchvision.models.list_models(), n=3)
            hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
            raise ModelError(f"unknown torchvision model {arch!r}{hint}")
        kwargs = {k: v for k, v in {**(supplied or {}), **kwargs}.items() if k != "in_channels"}
        return torchvision.models.get_model(arch, **kwargs)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ModelError(f"{name}: timm is not installed; pip install timm") from None
        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
            raise ModelError(f"unknown timm model {arch!r}{hint}")
        kwargs = {**(supplied or {}), **kwargs}
        if "in_channels" in kwargs:
            kwargs["in_chans"] = kwargs.pop("in_channels")
        kwargs.pop("pretrained", None)
        return timm.create_model(arch, pretrained=False, **kwargs)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        importable_from_cwd()
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            raise ModelError(f"model {name}: cannot import {module_name} ({e}); modules are "
                             "looked up in the working folder and on the Python path") from None
        except AttributeError:
            raise ModelError(f"model {name}: {module_name} has no {attr!r}") from None
        return fn(**_accepted(fn, kwargs, name, supplied))
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        if not close and "." in name.strip("."):
            module, _, fn = name.rpartition(".")
            hint = f"did you mean {module}:{fn} (package.module:factory, with a colon)? "
        raise ModelError(f"unknown model {name!r}; {hint}`ckptavg models` lists them")
    fn = _REGISTRY[name]
    return fn(**_accepted(fn, kwargs, name, supplied))


__all__ = ["ZOOS", "create_model", "list_models", "names_code", "register_model"]
