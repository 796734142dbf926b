"""Rebuild a network from a checkpoint: model.* metadata (or --model) plus its weights.

`network()` is the one way every command that runs a stored network over data (bn-fix,
eval, ensemble, width, replicate; soup, search and swag through `network_for`) builds it:
the model and data set from the options, else from the checkpoint's metadata; the data
folder from --data-dir, else the one the run recorded (data.dir), else the default."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ckptavg.errors import CkptavgError, ModelError, OptionError
from ckptavg.io.checkpoint import load
from ckptavg.nn.data import INFO, data_info, get_dataset
from ckptavg.nn.models import create_model, names_code
from ckptavg.options import DataOptions, ModelOptions, Reading


@dataclass
class Network:
    """A network rebuilt from a checkpoint, with the data set it runs over.

    `state` and `meta` are the checkpoint's weights and metadata as read (`state` is None
    from `network_for`, which loads no weights); `data` is the data set's name and
    `data_dir` its folder; `kwargs` what the factory was called with (the user's
    --model-kwargs, plus the classes and channels the data set tells where the factory
    takes them)."""

    path: str
    net: torch.nn.Module
    state: dict | None
    meta: dict
    data: str
    data_dir: str | None
    download: bool
    arch: str
    kwargs: dict

    def dataset(self, split: str, augment: bool = False):
        """The data set's `split` (train or test), as `get_dataset` gives it."""
        return get_dataset(self.data, split, self.data_dir, augment=augment,
                           download=self.download)


def network_for(meta: dict[str, str], path: str, model: ModelOptions | str | None = None,
                data: DataOptions | str | None = None) -> Network:
    """The network a checkpoint's metadata (or `model`, `data`) names, without its weights:
    for the commands that load several candidates' weights into one network."""
    m, d = ModelOptions.of(model), DataOptions.of(data)
    data_name, arch, kwargs = model_and_data(meta, m.model, m.model_kwargs, d.data, path)
    data_dir = data_folder(meta, data_name, d.data_dir)
    net, kwargs = build_model(arch, kwargs, data_name, data_dir)
    return Network(path, net, None, meta, data_name, data_dir, d.download, arch, kwargs)


def network(checkpoint, model: ModelOptions | str | None = None,
            data: DataOptions | str | None = None,
            reading: Reading | None = None) -> Network:
    """The network of `checkpoint` with its weights loaded (strictly; weights kept under one
    wrapper prefix, a Lightning module's `model.`, are found under it). `reading` finds the
    weights in a training checkpoint, as for `average`."""
    path = os.fspath(checkpoint)
    rd = Reading.of(reading)
    state, meta = load(path, key=rd.key, strip_prefix=rd.strip_prefix)
    built = network_for(meta, path, model, data)
    load_weights(built.net, state, path)
    built.state = state
    return built


def data_folder(meta: dict[str, str], data_name: str, data_dir: str | None) -> str | None:
    """--data-dir when given; else the folder the run recorded (`data.dir`, written by
    `ckptavg train`) when the data set is the run's and the folder is there; else None (the
    default folder). A folder is only read from, so taking it from a file runs nothing."""
    if data_dir:
        return data_dir
    recorded = meta.get("data.dir")
    if recorded and data_name == meta.get("data.name") and os.path.isdir(recorded):
        return recorded
    return None

# Factory arguments that download or load weights: never taken from a file's metadata.
FETCHING_KWARGS = {"weights", "weights_backbone", "pretrained", "pretrained_cfg",
                   "pretrained_cfg_overlay", "checkpoint_path", "pretrained_path"}


def model_and_data(meta: dict[str, str], model: str | None, model_kwargs: dict | None,
                   data: str | None, path: str) -> tuple[str, str, dict]:
    """(data set name, arch, kwargs) of a checkpoint: --model and --data win, else its
    model.* and data.name metadata, which may not name code. What neither gives is named in
    one line (both at once, for a checkpoint not written by ckptavg)."""
    lacking = [(option, key) for option, given, key in (("model", model, "model.arch"),
                                                         ("data", data, "data.name"))
               if not given and not meta.get(key)]
    if lacking:
        raise OptionError(tuple(o for o, _ in lacking), f"missing: {path} has no "
                          f"{' or '.join(k for _, k in lacking)} metadata (it was not written "
                          "by ckptavg train), so name them: a model (`ckptavg models`, "
                          "torchvision:NAME or package.module:factory) and a data set (cifar10 "
                          "... or package.module:function)")
    return _data_name(meta, data, path), *_model_spec(meta, model, model_kwargs, path)


def _model_spec(meta: dict[str, str], model: str | None, model_kwargs: dict | None,
                path: str) -> tuple[str, dict]:
    """(arch, kwargs): --model wins; else the checkpoint's model.arch/model.kwargs."""
    if model:
        return model, dict(model_kwargs or {})
    arch = meta["model.arch"]
    if names_code(arch):
        raise ModelError(
            f"{path}: its model.arch metadata names code ({arch!r}), and code named by a file "
            f"is never run; if you trust it, name it yourself: --model {arch}"
        )
    try:
        kwargs = json.loads(meta.get("model.kwargs") or "{}")
    except (json.JSONDecodeError, RecursionError):
        kwargs = None
    if not isinstance(kwargs, dict):
        raise ModelError(f"{path}: model.kwargs metadata is not a JSON object; pass the "
                         "model kwargs yourself (--model-kwargs)")
    fetch = sorted(set(kwargs) & FETCHING_KWARGS)
    if fetch:
        raise ModelError(f"{path}: its model.kwargs ask to load weights ({fetch[0]}), which a "
                         "file may not do; pass the model and its kwargs yourself")
    kwargs.update(model_kwargs or {})
    return arch, kwargs


def _data_name(meta: dict[str, str], data: str | None, path: str) -> str:
    """--data wins; else the checkpoint's data.name, which may not name code."""
    if data:
        return data
    name = meta["data.name"]
    if ":" in name:
        raise CkptavgError(
            f"{path}: its data.name metadata names code ({name!r}), and code named by a file "
            f"is never run; if you trust it, name it yourself: --data {name}"
        )
    return name


def build_model(arch: str, kwargs: dict, data_name: str, data_dir: str | None = None):
    """create_model with num_classes/in_channels from the data set where it tells them and
    the factory takes them; the user's `kwargs` always win.

    A network whose first convolution takes another number of channels than the data set's
    images is refused here, in one line, rather than failing inside its forward pass."""
    kwargs = dict(kwargs)
    known = data_name in INFO and data_name != "imagefolder"
    ds = None if known or {"num_classes", "in_channels"} <= set(kwargs) else \
        get_dataset(data_name, "train", data_dir)
    info = data_info(data_name, ds)
    net = create_model(arch, supplied={"num_classes": info.num_classes,
                                       "in_channels": info.in_channels}, **kwargs)
    for k, v in (("num_classes", info.num_classes), ("in_channels", info.in_channels)):
        if v is not None:
            kwargs.setdefault(k, v)
    if data_name in INFO:
        first = next((m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)),
                     None)
        if first is not None and first.in_channels != info.in_channels:
            raise ModelError(
                f"model {arch} takes {first.in_channels}-channel images but {data_name} has "
                f"{info.in_channels}-channel images; choose a model for {info.in_channels} "
                "channels or another data set"
            )
    return net, kwargs


def wrapper_prefix(expected: list[str], found: list[str]) -> str | None:
    """The one prefix under which every key the model expects is found (Lightning's `model.`,
    a wrapper's `net.`): `found` is exactly `expected` with it in front; else None."""
    if not expected or len(found) != len(expected):
        return None
    first = expected[0]
    for f in found:
        if f.endswith("." + first) or (f.endswith(first) and f != first):
            prefix = f[: len(f) - len(first)]
            if prefix and {prefix + k for k in expected} == set(found):
                return prefix
    return None


def _prefix_hint(found: list[str], net: torch.nn.Module, expected: list[str]) -> str:
    """`--strip-prefix P.` when every unexpected key starts with the same component P, P is
    not one of the network's own submodules (VGG's `features.` is real) and stripping it
    leaves keys the network has."""
    heads = {k.split(".", 1)[0] for k in found}
    if len(heads) != 1 or not all("." in k for k in found):
        return ""
    head = heads.pop()
    if head in dict(net.named_children()):
        return ""
    if not {k.split(".", 1)[1] for k in found} & set(expected):
        return ""
    return f"; if the weights sit under {head}., pass --strip-prefix {head}."


def load_weights(net: torch.nn.Module, state: dict, path: str) -> None:
    """Load `state` into `net` strictly. Weights kept under one wrapper prefix (a Lightning
    module's `model.`) are found under it, as `average` finds the state dict in the file."""
    result = net.state_dict()
    missing = [k for k in result if k not in state]
    unexpected = [k for k in state if k not in result]
    prefix = wrapper_prefix(missing, unexpected) if missing and unexpected else None
    if prefix is not None:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        missing, unexpected = [], []
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in result.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape {', '.join(shapes[:3])}")
        hint = _prefix_hint(unexpected, net, list(result)) if missing and unexpected else ""
        raise ModelError(f"{path}: weights do not fit the model: {'; '.join(parts)}; "
                         f"check --model/--model-kwargs{hint}")
    net.load_state_dict(state, strict=True)
