"""Model registry: `@register_model` factories, `create_model(name, **kwargs)`.

Names are registry names (`preresnet164`), `torchvision:NAME` (torchvision's builders) or
`package.module:factory` (a user's own network). Factories take `num_classes` and
`in_channels`; the data set supplies both.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable

from ckptavg.errors import ModelError, OptionError, users_code

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


def _params(fn: Callable) -> str:
    """A factory's parameters, as an error names them."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return "(its signature cannot be read)"
    return ", ".join(("**" + p.name) if p.kind is p.VAR_KEYWORD else ("*" + p.name)
                     if p.kind is p.VAR_POSITIONAL else p.name for p in params) or "nothing"


def _accepted(fn: Callable, kwargs: dict, name: str, supplied: dict | None = None) -> dict:
    """What the factory is called with. Every argument the user gave (`kwargs`) is passed
    when the signature names it or takes **kwargs, and refused by name otherwise, before the
    call; `supplied` (num_classes/in_channels inferred from the data set, when known) only
    where the signature names them, and never over the user's own."""
    supplied = {k: v for k, v in (supplied or {}).items() if k not in kwargs and v is not None}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {**supplied, **kwargs}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not var_kw]
    if unknown:
        raise OptionError("model_kwargs", f"the factory of {name} takes no argument "
                          f"{unknown[0]!r}; it takes: {_params(fn)}")
    out = {**{k: v for k, v in supplied.items() if k in params}, **kwargs}
    missing = [p.name for p in params.values() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in out]
    if missing:
        raise OptionError("model_kwargs", f"the factory of {name} needs the argument "
                          f"{missing[0]!r}, which the data set does not give; give it "
                          f"(it takes: {_params(fn)})")
    return out


# What a TypeError raised by calling a factory says when the call's arguments do not fit it.
_KWARG_COMPLAINT = re.compile(r"unexpected keyword argument|got multiple values for|"
                              r"missing [0-9]+ required (keyword-only |positional )?argument")
# What asks a model zoo's factory to download weights.
_DOWNLOADS = ("pretrained", "weights", "weights_backbone", "pretrained_cfg_overlay")


def _offline(e: BaseException) -> bool:
    """Whether `e` is a failed download (no network, no cached file)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, OSError) or bool(names & {"LocalEntryNotFoundError", "HfHubHTTPError",
                                                   "OfflineModeIsEnabled", "URLError"})


def _call(name: str, make: Callable, kwargs: dict, takes: str):
    """Build with the user's code (or a zoo's). A TypeError from the call whose message is
    about its arguments is one line naming the model kwargs and what the factory takes; a
    failed download the kwargs asked for is one line that says so; anything else raised
    inside is the factory's own error (a traceback, marked as the user's code)."""
    with users_code(f"the model factory {name}"):
        try:
            return make()
        except TypeError as e:
            if not _KWARG_COMPLAINT.search(str(e)):
                raise
            raise OptionError("model_kwargs", f"{name} refuses the arguments it was called with "
                              f"({e}); it takes: {takes}", json.dumps(kwargs, default=str),
                              ) from None
        except Exception as e:
            asked = [k for k in _DOWNLOADS if kwargs.get(k) not in (None, False)]
            if not asked or not _offline(e):
                raise
            raise ModelError(f"model {name}: {asked[0]}={kwargs[asked[0]]!r} downloads weights, "
                             f"and the download failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); with no network, drop "
                             f"{asked[0]} from the model kwargs: the checkpoint's weights are "
                             "loaded over them anyway") from None


def _unknown(zoo: str, arch: str, names: list[str]) -> OptionError:
    close = difflib.get_close_matches(arch, names, n=3)
    hint = f"; did you mean {', '.join(zoo + c for c in close)}?" if close else ""
    return OptionError("model", f"unknown {zoo.rstrip(':')} model {arch!r}{hint}",
                       zoo + arch)


def create_model(name: str, *, supplied: dict | None = None, **kwargs):
    """Build a model by name.

    Args:
        name: a registered name, `torchvision:NAME`, `timm:NAME` (when timm is installed) or
            `package.module:factory` (imports and calls your code: pass only names you trust).
        supplied: arguments inferred by the caller (num_classes, in_channels from the data
            set; None where unknown), passed only where the factory's signature names them
            (a zoo's: num_classes, and timm's in_chans) and never over the user's own.
        **kwargs: the user's arguments (e.g. num_classes=10), each passed (also through a
            factory's **kwargs) or refused by name; they always win.

    Returns:
        A `torch.nn.Module`. An unknown name, or arguments the factory does not take, are an
        OptionError (model, model_kwargs); a download the arguments ask for that fails is a
        ModelError. Any other exception raised inside the factory propagates unchanged.

    Example:
        >>> net = create_model("preresnet20", num_classes=10, in_channels=1)
        >>> sum(p.numel() for p in net.parameters())
        271994
    """
    known = {k: v for k, v in (supplied or {}).items() if v is not None}
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models():
            raise _unknown("torchvision:", arch, torchvision.models.list_models())
        kw = {**({"num_classes": known["num_classes"]} if "num_classes" in known else {}),
              **kwargs}
        # torchvision's classifiers take 3-channel images and no in_channels argument (a
        # `train` run records in_channels among its model kwargs)
        if kw.get("in_channels", 3) != 3:
            raise OptionError("model_kwargs", f"{name} takes 3-channel images (torchvision's "
                              f"models have no in_channels), not {kw['in_channels']}; choose "
                              "a model for that many channels")
        kw.pop("in_channels", None)
        return _call(name, lambda: torchvision.models.get_model(arch, **kw), kw,
                     "weights, progress and the model class's own arguments (num_classes, ...)")
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ModelError(f"{name}: timm is not installed; pip install timm") from None
        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise _unknown("timm:", arch, timm.list_models())
        kw = dict(kwargs)
        if "in_channels" in kw:  # the user's, in timm's spelling
            kw["in_chans"] = kw.pop("in_channels")
        inferred = {"num_classes": known.get("num_classes"), "in_chans": known.get("in_channels")}
        kw = {**{k: v for k, v in inferred.items() if v is not None and k not in kw}, **kw}
        kw.setdefault("pretrained", False)
        return _call(name, lambda: timm.create_model(arch, **kw), kw,
                     "pretrained, num_classes, in_chans and the model class's own arguments")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        importable_from_cwd()
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except ImportError as e:
            raise OptionError("model", f"cannot import {module_name} ({e}); modules are looked "
                              "up in the working folder and on the Python path", name) from None
        except AttributeError:
            close = difflib.get_close_matches(attr, dir(sys.modules[module_name]), n=3)
            hint = f"; did you mean {', '.join(module_name + ':' + c for c in close)}?" \
                if close else ""
            raise OptionError("model", f"{module_name} has no {attr!r}{hint}", name) from None
        kw = _accepted(fn, kwargs, name, known)
        return _call(name, lambda: fn(**kw), kw, _params(fn))
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        if not close and "." in name.strip("."):
            module, _, fn = name.rpartition(".")
            hint = f"did you mean {module}:{fn} (package.module:factory, with a colon)? "
        raise OptionError("model", f"unknown model; {hint}`ckptavg models` lists them, and "
                          "torchvision:NAME, timm:NAME and package.module:factory name others",
                          name)
    fn = _REGISTRY[name]
    return fn(**_accepted(fn, kwargs, name, known))


__all__ = ["ZOOS", "create_model", "list_models", "names_code", "register_model"]
