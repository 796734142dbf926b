"""torch.save files: weights-only unpickling, memory-mapped, nested checkpoints.

The file is opened once; torch loads it through that descriptor (`/proc/self/fd/N` names
the open file itself, not the path, so a replacement of the path is never read). Zip-format
files are mapped (`mmap=True`): tensor data stays in the file until read, and `release`
hands the pages back, so the resident set is bounded by one tensor per input. Legacy
(pre-1.6, non-zip) files cannot be mapped and are loaded whole.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import types
import warnings

import torch

from ckptavg.errors import CheckpointError
from ckptavg.io.base import (
    AVERAGED_COUNT,
    STATE_DICT_KEYS,
    Extent,
    Position,
    ReaderBase,
    SourceFile,
    TensorSpec,
    clean_metadata,
    drop_pages,
    fd_path,
    find_ties,
    is_averaged_model,
    keep_descriptor,
    open_source,
    strip_keys,
    whole_number,
)

# Top-level configuration entries carried into a torch output of the same ecosystem:
# Lightning's (load_from_checkpoint needs the version and rebuilds from the hyper-parameters)
# and fairseq's cfg/args. Optimizer, loop and callback state never are.
CARRIED = ("pytorch-lightning_version", "hparams_name", "hyper_parameters",
           "datamodule_hparams_name", "datamodule_hyper_parameters", "cfg", "args")
STEP_ENTRIES = ("global_step", "step", "num_updates", "iteration")


class Opaque(dict):
    """Stands in for an object of a class the file names but ckptavg never imports (a
    user's config class in a Lightning checkpoint's hyper-parameters). Holds what the
    pickle gave it; nothing of the class runs."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}, not imported>"


def _opaque(module: str, name: str) -> type:
    return type(name, (Opaque,), {"global_name": f"{module}.{name}", "__module__": __name__})


def _allowed_globals() -> dict[str, object]:
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(getattr(wou, "_get_user_allowed_globals", dict)())
    for obj in _safe_globals():
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return allowed


# A standard-library global outside the allowlist (os.system, subprocess.Popen, eval) is
# never a user's data class: such a file is refused, not loaded with a stand-in.
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy"}


class _OpaqueUnpickler(pickle.Unpickler):
    """Torch's weights-only allowlist, and an Opaque stand-in for any other global outside
    the standard library: the file loads without importing or running anything it names."""

    allowed: dict[str, object] = {}

    def find_class(self, module: str, name: str):
        obj = self.allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        if module.split(".")[0] in _STDLIB:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return _opaque(module, name)


def _safe_globals() -> list:
    """Harmless globals found in common training checkpoints (plain data holders)."""
    import argparse
    import pathlib

    allowed: list = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [
            getattr(np.dtypes, n)
            for n in dir(np.dtypes)
            if n.endswith("DType") and isinstance(getattr(np.dtypes, n), type)
        ]
    except Exception:  # numpy absent or of another layout: nothing more is allowed
        pass
    return allowed


_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
                IndexError, MemoryError, OverflowError, RecursionError, pickle.UnpicklingError)


def torch_load(path: str, fd: int, mmap: bool) -> object:
    """`torch.load(weights_only=True)` of the open file `fd`, with clear errors; never an
    unsafe fallback. A zip-format file that names a class outside the allowlist (a config
    object among Lightning's hyper-parameters) is loaded again with that class replaced by an
    inert `Opaque` stand-in: the tensors are plain, and nothing the file names is imported
    or run. torch's own warnings are not passed on to the user."""
    ctx = (torch.serialization.safe_globals(_safe_globals())
           if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext())
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(fd_path(fd, path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not mmap or not m:  # a legacy file, or not a matter of globals: refuse
            what = f"the global {m.group(1)}" if m else "content outside the weights-only allowlist"
            raise CheckpointError(
                f"{path}: refused to unpickle {what} (code named by a file is never run); "
                "re-save the weights with torch.save(model.state_dict()) or as safetensors"
            ) from None
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None
    unpickler = type("Unpickler", (_OpaqueUnpickler,), {"allowed": _allowed_globals()})
    module = types.SimpleNamespace(__name__="ckptavg_opaque_pickle", Unpickler=unpickler,
                                   load=pickle.load, loads=pickle.loads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(fd_path(fd, path), map_location="cpu", weights_only=False,
                              mmap=True, pickle_module=module)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"{path}: refused to unpickle the global {m.group(1) if m else '?'} (code named by "
            "a file is never run); re-save the weights with torch.save(model.state_dict()) or "
            "as safetensors"
        ) from None
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None


def _corrupt(path: str, e: BaseException) -> CheckpointError:
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return CheckpointError(f"{path}: cannot load torch checkpoint ({first}); the file is "
                           "corrupt or incomplete")


def find_state_dict(obj: object, key: str | None, path: str) -> tuple[dict, str]:
    """(state dict, where it was found) inside a possibly nested training checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "save model.state_dict() instead of the model"
        )
    if key is not None:
        node: object = obj
        for part in key.split("/") if key not in obj else [key]:
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(
                    f"{path}: no entry {key!r} (top-level keys: {_list(obj)}); name the entry "
                    "that holds the weights"
                )
            node = node[part]
        if not isinstance(node, dict) or not _has_tensor(node):
            raise CheckpointError(f"{path}: entry {key!r} holds no tensors; name another entry")
        return node, key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "<top level>"
    for name in STATE_DICT_KEYS:
        node = obj.get(name)
        if isinstance(node, dict) and _has_tensor(node):
            if all(isinstance(v, torch.Tensor) for v in node.values()):
                return node, name
            inner, where = find_state_dict(node, None, path)
            return inner, f"{name}/{where}"
    if _has_tensor(obj) and not any(isinstance(v, dict) and _has_tensor(v) for v in obj.values()):
        return obj, "<top level>"
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {_list(obj)}); "
        "name the entry that holds the weights (--key)"
    )


def _has_tensor(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _list(d: dict, n: int = 8) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_tensor(path: str, key: object, t: torch.Tensor) -> None:
    """Only plain dense CPU tensors of real dtypes are weights ckptavg can average."""
    if not isinstance(key, str):
        raise CheckpointError(f"{path}: state dict has a non-string key {key!r}; "
                              "state dicts map parameter names to tensors")
    problem = None
    if t.layout != torch.strided:
        problem = f"is a {str(t.layout).replace('torch.', '')} tensor"
    elif t.is_meta or t.device.type == "meta":
        problem = "is a meta tensor (it has no data)"
    elif t.is_quantized:
        problem = "is a quantized tensor"
    elif t.is_complex():
        problem = f"has complex dtype {str(t.dtype).replace('torch.', '')}"
    if problem:
        raise CheckpointError(f"{path}: tensor {key!r} {problem}, which ckptavg cannot "
                              "average; convert it to a dense real tensor and re-save")


def position_of(obj: object) -> Position:
    """Epoch and step a training library wrote into the checkpoint: Lightning's `epoch` and
    `global_step`, timm's `epoch`, fairseq's train_iterator epoch and num_updates."""
    if not isinstance(obj, dict):
        return Position()
    epoch, epoch_from = whole_number(obj.get("epoch")), "checkpoint entry 'epoch'"
    step, step_from = None, ""
    for name in STEP_ENTRIES:
        step = whole_number(obj.get(name))
        if step is not None:
            step_from = f"checkpoint entry {name!r}"
            break
    extra = obj.get("extra_state")
    if epoch is None and isinstance(extra, dict) and isinstance(extra.get("train_iterator"), dict):
        epoch = whole_number(extra["train_iterator"].get("epoch"))
        epoch_from = "checkpoint entry 'extra_state/train_iterator/epoch'"
    history = obj.get("optimizer_history")
    if step is None and isinstance(history, list) and history and isinstance(history[-1], dict):
        step = whole_number(history[-1].get("num_updates"))
        step_from = "checkpoint entry 'optimizer_history/num_updates'"
    return Position(epoch, step, epoch_from if epoch is not None else "",
                    step_from if step is not None else "")


def _has_opaque(obj: object) -> bool:
    if isinstance(obj, Opaque):
        return True
    if isinstance(obj, dict):
        return any(_has_opaque(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_opaque(v) for v in obj)
    return False


class TorchReader(ReaderBase):
    """A torch.save file. Pass `fd`/`src` when the file is already open (it is taken over)."""

    def __init__(self, path: str, key: str | None = None, strip_prefix: str | None = None,
                 mmap: bool = True, fd: int | None = None, src: SourceFile | None = None):
        self.path = path
        self.format = "torch" if mmap else "torch-legacy"
        self._mmap = mmap
        if fd is None:
            fd, src = open_source(path)
        self._fd = None
        try:
            obj = torch_load(path, fd, mmap=mmap)
            self.files = [src]
            state, self.location = find_state_dict(obj, key, path)
            self._meta = clean_metadata(obj.get("metadata")) if isinstance(obj, dict) else {}
            self._position = position_of(obj)
            top = obj if isinstance(obj, dict) else {}
            self._scalars = {str(k): float(v) for k, v in top.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}
            # Entries holding a class ckptavg did not import cannot be written back faithfully.
            self._extras = {k: top[k] for k in CARRIED if k in top and not _has_opaque(top[k])}
            self.dropped_extras = tuple(k for k in CARRIED if k in top and k not in self._extras)
            # Entries besides the weights and our metadata (optimizer, loops, configs).
            self.other_entries = tuple(str(k) for k, v in top.items()
                                       if v is not state and k != "metadata")
            self.others = tuple(k for k, v in obj.items() if isinstance(v, dict) and v is not state
                                and _has_tensor(v)) if isinstance(obj, dict) else ()
            # Optimizer state, epochs, configs: never averaged, never copied.
            self._tensors = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    _check_tensor(path, k, v)
                    self._tensors[k] = v
            if is_averaged_model(list(self._tensors)):
                count = self._tensors.pop(AVERAGED_COUNT)
                self._meta.setdefault("swa.n_averaged", str(int(count.item())))
            self._names, removed = strip_keys(list(self._tensors), strip_prefix, path)
            self.removed_prefixes = tuple(removed)
            self._lowest = min((t.untyped_storage().data_ptr() for t in self._tensors.values()
                                if t.numel()), default=0)
            self._ties = find_ties({public: self._tensors[raw] for public, raw in self._names.items()})
            self._base = _map_start(self._lowest, fd, src) if mmap and self._lowest else None
            if self._base is not None and keep_descriptor(fd):
                self._fd = fd  # tensors are then read with pread (see locate)
        finally:
            if self._fd is None:
                os.close(fd)

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def info(self, key: str) -> TensorSpec:
        t = self._tensors[self._raw(key)]
        return TensorSpec(key, tuple(t.shape), t.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[self._raw(key)]

    def locate(self, key: str) -> Extent | None:
        t = self._tensors[self._raw(key)]
        if self._fd is None or not t.numel() or not t.is_contiguous():
            return None
        return Extent(self._fd, t.data_ptr() - self._base, self.path)

    def release(self, key: str) -> None:
        if self._mmap:
            storage = self._tensors[self._raw(key)].untyped_storage()
            drop_pages(storage.data_ptr(), storage.nbytes())

    def release_range(self, key: str, start: int, nbytes: int) -> None:
        if self._mmap:
            t = self._tensors[self._raw(key)]
            # `start` may be negative: pages of the file before this tensor, never before the
            # file's first storage (all storages are views of one map of the file).
            lo = max(t.data_ptr() + start, self._lowest)
            drop_pages(lo, t.data_ptr() + start + nbytes - lo)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def position(self) -> Position:
        return self._position.merged(super().position())

    def extras(self) -> dict[str, object]:
        return dict(self._extras)

    def scalars(self) -> dict[str, float]:
        return dict(self._scalars)

    def close(self) -> None:
        self._tensors = {}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _map_start(ptr: int, fd: int, src: SourceFile) -> int | None:
    """The address at which byte 0 of the file would lie in the map torch made of it, so that
    a tensor's file offset is its address minus this; None where it cannot be established
    (not Linux, or the file's storages were byte-swapped on load: their bytes in the file are
    not the tensor's).

    Found from /proc/self/maps: the mapping that holds `ptr` (a storage of the file), checked
    to be of this file's inode."""
    if not _native_order(fd, src.path):
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, offset, _, inode = line.split(None, 5)[:5]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= ptr < hi:
                    return lo - int(offset, 16) if int(inode) == src.identity[1] else None
    except (OSError, ValueError):
        return None
    return None


def _native_order(fd: int, path: str) -> bool:
    """Whether the zip's `byteorder` record, if any, is this machine's (torch swaps the
    bytes of a foreign-order file on load, in memory only). Read through the open `fd`."""
    import zipfile

    try:
        with open(fd_path(fd, path), "rb") as f, zipfile.ZipFile(f) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
            return not names or z.read(names[0]).decode(errors="replace") == sys.byteorder
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return False


def load_torch_file(path: str) -> object:
    """The whole object of a torch file, weights-only (for callers that need it all)."""
    path = os.fspath(path)
    fd, _ = open_source(path)
    try:
        return torch_load(path, fd, mmap=False)
    finally:
        os.close(fd)
