"""torch.save files: weights-only unpickling, memory-mapped, nested checkpoints.

Zip-format files are loaded with `mmap=True`, so tensor data stays in the file until read;
after a tensor has been used its pages are handed back with madvise(MADV_DONTNEED), which
keeps the resident set bounded by one tensor per input rather than by the model. Legacy
(pre-1.6, non-zip) files cannot be mapped and are loaded whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pickle
import re

import torch

from ckptavg.errors import CheckpointError
from ckptavg.io.reader import ReaderBase, TensorInfo, clean_metadata, find_ties, strip_keys

# Where training checkpoints keep the model's weights, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # not Linux/glibc: pages are released at close instead
    _madvise = None


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


def torch_load(path: str, mmap: bool) -> object:
    """`torch.load(weights_only=True)` with clear errors; never an unsafe fallback."""
    ctx = (
        torch.serialization.safe_globals(_safe_globals())
        if hasattr(torch.serialization, "safe_globals")
        else contextlib.nullcontext()
    )
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the global {m.group(1)}" if m else "content outside the weights-only allowlist"
        raise CheckpointError(
            f"{path}: refused to unpickle {what} (arbitrary code is never run); "
            "re-save the weights with torch.save(model.state_dict()) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load torch checkpoint ({first})") from None


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
                    f"{path}: no entry {key!r} (top-level keys: {_list(obj)}); check --key"
                )
            node = node[part]
        if not isinstance(node, dict) or not _has_tensor(node):
            raise CheckpointError(f"{path}: entry {key!r} holds no tensors; check --key")
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
        "name the entry that holds the weights with --key"
    )


def _has_tensor(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in d.values())


def _list(d: dict, n: int = 8) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


class TorchReader(ReaderBase):
    def __init__(self, path: str, key: str | None = None, strip_prefix: str | None = None,
                 mmap: bool = True):
        self.path = path
        self.format = "torch" if mmap else "torch-legacy"
        self._mmap = mmap
        obj = torch_load(path, mmap=mmap)
        state, self.location = find_state_dict(obj, key, path)
        self._meta = clean_metadata(obj.get("metadata")) if isinstance(obj, dict) else {}
        # Optimizer state, epochs, configs: never averaged, never copied.
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._names = strip_keys(list(self._tensors), strip_prefix, path)
        self._ties = self._find_ties()

    def _find_ties(self) -> dict[str, str]:
        return find_ties({public: self._tensors[raw] for public, raw in self._names.items()})

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[self._raw(key)]
        return TensorInfo(tuple(t.shape), t.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[self._raw(key)]

    def release(self, key: str) -> None:
        if not self._mmap or _madvise is None:
            return
        storage = self._tensors[self._raw(key)].untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return
        lo = start - start % _PAGE
        hi = start + size
        hi += (-hi) % _PAGE
        # The mapping is private and never written, so dropping its pages loses nothing:
        # a later touch faults them back in from the page cache.
        _madvise(lo, hi - lo, _MADV_DONTNEED)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        self._tensors = {}


def load_torch_file(path: str) -> object:
    """The whole object of a torch file, weights-only (for callers that need it all)."""
    return torch_load(os.fspath(path), mmap=False)
