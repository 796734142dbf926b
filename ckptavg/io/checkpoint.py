"""Whole-checkpoint helpers of the public API: load, save, inspect (which, like averaging,
never imports torch for what it can describe without it)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptavg.io import TensorSpec, make_writer, open_checkpoint
from ckptavg.io.keys import find_ties
from ckptavg.lazy import import_torch
from ckptavg.results import Result

if TYPE_CHECKING:
    import torch


def load(path: str | os.PathLike, key: str | None = None,
         strip_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole checkpoint.

    Args:
        path: any format `open_checkpoint` reads.
        key: for torch files, the entry holding the state dict.
        strip_prefix: remove this prefix from every key (`module.` and `_orig_mod.` go by
            themselves).

    Returns:
        (state dict of tensors, metadata map).

    Example:
        >>> state, meta = ckptavg.load("runs/a/epoch-0001.safetensors")
        >>> meta["model.arch"], state["fc.weight"].shape
        ('convnet_bn', torch.Size([10, 128]))
    """
    with open_checkpoint(path, key=key, strip_prefix=strip_prefix) as r:
        state = {}
        for k in r.keys():
            if k in r.ties():
                continue
            state[k] = r.read(k).clone()
            r.release(k)
        for k, v in r.ties().items():
            state[k] = state[v]
        state = {k: state[k] for k in r.keys()}
        return state, r.metadata()


@dataclass
class Layout:
    """How a checkpoint keeps its weights, for an output that should load where it loaded:
    each public (prefix-stripped) name's stored name, the torch entry holding the weights,
    and the entries a torch output of the same framework carries (Lightning's
    hyper-parameters and version, fairseq's cfg)."""

    names: dict[str, str]
    entry: str | None  # None: a bare state dict (io.checkpoint.weights_entry)
    extras: dict
    averaged_count: int | None = None  # an AveragedModel's n_averaged, written back beside


def layout_of(path: str | os.PathLike, key: str | None = None,
              strip_prefix: str | None = None) -> Layout:
    """The Layout of the checkpoint at `path` (its header and pickle only: no weights read)."""
    with open_checkpoint(path, key=key, strip_prefix=strip_prefix) as r:
        entry = weights_entry(r.location, r.other_entries)
        return Layout({k: r.stored_name(k) for k in r.keys()}, entry,
                      r.extras() if entry is not None else {}, r.averaged_count)


# A file holding exactly these entries is fastai's `learn.save(with_opt=True)`: its loader
# unwraps only this pair and takes anything else as a bare state dict.
FASTAI_ENTRIES = {"model", "opt"}


def weights_entry(location: str, other_entries: tuple[str, ...] = ()) -> str | None:
    """Where a torch output keeps the weights, given where its input kept them, so the
    user's loader finds them where it found the input's: the same top-level entry
    (`state_dict`, `model`, `model_state_dict`...); None, a bare state dict, for a bare
    one (`torch.save(model.state_dict())`) and for fastai's {model, opt} (whose optimizer
    state is not carried, and whose loader takes a bare state dict); `state_dict` for a
    nested one."""
    if location == "<top level>" or {location, *other_entries} == FASTAI_ENTRIES:
        return None
    return location if location != "metadata" and "/" not in location else "state_dict"


def save(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
         metadata: dict[str, str] | None = None, shard_size: int | None = None,
         overwrite: bool | None = None, *, entry: str | None = "state_dict",
         extras: dict | None = None) -> None:
    """Write a state dict atomically; the suffix picks the format (.safetensors, .pt, folder).

    Args:
        state_dict: name -> tensor (other values are skipped); tied tensors stay tied.
        path: `.safetensors`, a torch suffix (`.pt .pth .bin .ckpt`) or a folder (sharded
            safetensors, with `shard_size`).
        metadata: str -> str entries (the metadata contract in docs/formats.md).
        shard_size: the largest shard in bytes, for a folder output.
        overwrite: replace an existing file that is not an output of ckptavg (a training
            checkpoint, a file of yours); default: only within `ckptavg.io.replacing()`
            (the CLI's --overwrite). An earlier output of ckptavg is always replaced.
        entry, extras: for a torch output, the entry that holds the weights (None: a bare
            state dict, the metadata set on it as an attribute) and other entries to carry
            (a Layout's: so that the framework's loader reads it).

    Returns:
        None; the file appears complete or not at all.

    Example:
        >>> import torch
        >>> ckptavg.save({"w": torch.ones(2)}, "copy.pt", {"train.epoch": "1"})
        >>> ckptavg.load("copy.pt")[1]["train.epoch"]
        '1'
    """
    path = os.fspath(path)
    torch = import_torch()
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    ties = find_ties(tensors)
    with make_writer(path, specs, {k: str(v) for k, v in (metadata or {}).items()},
                     shard_size, ties, overwrite=overwrite, entry=entry,
                     extras=extras) as writer:
        for k, v in tensors.items():
            if writer.shares_ties and k in ties:
                continue
            writer.write(k, v.detach().cpu())


@dataclass
class TensorEntry(Result):
    """One tensor of a checkpoint, as `inspect` lists it (file order)."""

    key: str
    shape: list[int]
    dtype: str  # torch's name without "torch.", e.g. "float32", "float8_e4m3fn"


@dataclass
class Quantization(Result):
    """A quantized checkpoint's scheme (io/quantized.py), where it was seen, and whether
    `average` averages it (in the weights' own space: FP8 with scales) or refuses it."""

    scheme: str
    seen: str  # "config.json" or the tensor layout that told it
    averaged: bool


@dataclass
class InspectResult(Result):
    """A checkpoint as ckptavg reads it: format, tensors, sizes, ties and metadata."""

    path: str
    format: str
    location: str | None  # where in a torch file the state dict was found
    other_tensor_dicts: list[str]
    other_entries: list[str]  # a torch file's entries besides the weights (optimizer, ...)
    removed_prefixes: list[str]
    tensors: int
    parameters: int
    bytes: int
    bytes_per_dtype: dict[str, int]
    tied: dict[str, str]
    metadata: dict[str, str]
    keys: list[TensorEntry]  # in file order
    quantization: Quantization | None = None  # a quantized checkpoint's scheme, else None


def inspect(path: str | os.PathLike, key: str | None = None,
            strip_prefix: str | None = None) -> InspectResult:
    """Format, tensor count, bytes per dtype, metadata and every key with shape and dtype.

    Args:
        path, key, strip_prefix: as for `load`.

    Returns:
        An InspectResult.

    Example:
        >>> info = ckptavg.inspect("runs/a/epoch-0001.safetensors")
        >>> info.format, info.tensors, info.metadata["data.name"]
        ('safetensors', 20, 'fashion-mnist')
    """
    path = os.fspath(path)
    with open_checkpoint(path, key=key, strip_prefix=strip_prefix) as r:
        infos = {k: r.info(k) for k in r.keys()}
        by_dtype: Counter = Counter()
        for i in infos.values():
            by_dtype[str(i.dtype).replace("torch.", "")] += i.nbytes
        return InspectResult(
            path, r.format, r.location, list(r.others), list(r.other_entries),
            list(r.removed_prefixes), len(infos),
            sum(i.numel for i in infos.values()), sum(by_dtype.values()), dict(by_dtype),
            r.ties(), r.metadata(),
            [TensorEntry(k, list(i.shape), str(i.dtype).replace("torch.", ""))
             for k, i in infos.items()], _quantization(r))


def _quantization(reader) -> Quantization | None:
    from ckptavg.io.quantized import scheme_of

    found = scheme_of(reader)
    if found is None:
        return None
    from ckptavg.errors import CkptavgError
    from ckptavg.io.quantized import quantized_layout

    try:
        layout = quantized_layout([reader])
    except CkptavgError:
        layout = None
    if layout is not None:  # averaged in the weights' own space (engine/fp8.py)
        return Quantization(layout.describe(), found[1], True)
    return Quantization(found[0], found[1], False)
