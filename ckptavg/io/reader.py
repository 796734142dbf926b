"""One small interface over every checkpoint format.

A reader lists tensor names, describes each one (shape, dtype, bytes) without reading it,
and reads one tensor at a time. `open_checkpoint` picks the format by content, then suffix.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Protocol

import torch

from ckptavg.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Wrapper prefixes added by DataParallel/DDP (module.) and torch.compile (_orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class TensorInfo:
    """What a reader knows of a tensor before reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Reader(Protocol):
    """What every checkpoint format offers. Keys are the public, prefix-stripped names."""

    path: str
    format: str

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def read(self, key: str) -> torch.Tensor:
        """The tensor, possibly a view of a mapped file: valid until release(key) or close()."""
        ...

    def release(self, key: str) -> None:
        """Hint that the caller is done with `key`: mapped pages may be dropped."""
        ...

    def metadata(self) -> dict[str, str]: ...

    def ties(self) -> dict[str, str]:
        """Aliases: key -> the earlier key whose storage it shares."""
        ...

    def close(self) -> None: ...


def strip_keys(raw: list[str], strip_prefix: str | None, path: str) -> dict[str, str]:
    """Public name -> raw name. Wrapper prefixes go when every key carries them."""
    names = list(raw)
    changed = True
    while changed and names:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(n.startswith(p) for n in names):
                names = [n[len(p):] for n in names]
                changed = True
    if strip_prefix:
        if not any(n.startswith(strip_prefix) for n in names):
            raise CheckpointError(
                f"{path}: no key starts with --strip-prefix {strip_prefix!r} "
                f"(first keys: {', '.join(names[:3])}); check the prefix"
            )
        names = [n[len(strip_prefix):] if n.startswith(strip_prefix) else n for n in names]
    mapping: dict[str, str] = {}
    for public, original in zip(names, raw):
        if public in mapping:
            raise CheckpointError(
                f"{path}: keys {mapping[public]!r} and {original!r} both become {public!r} "
                "after stripping prefixes; use --strip-prefix with a longer prefix"
            )
        mapping[public] = original
    return mapping


def sniff(path: str) -> str:
    """'safetensors', 'torch-zip', 'torch-legacy' or 'safetensors-sharded' by content."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX_NAME)):
            return "safetensors-sharded"
        if os.path.exists(os.path.join(path, "model.safetensors")):
            return "safetensors-folder"
        raise CheckpointError(
            f"{path}: folder has no {INDEX_NAME} or model.safetensors; "
            f"to average the files in it, pass them: {path}/*.safetensors"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; check the path or glob") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n < 100_000_000:
            return "safetensors"
    if head[:2] == b"\x80\x02":  # pickle protocol 2: torch's legacy (pre-1.6) format
        return "torch-legacy"
    raise CheckpointError(
        f"{path}: not a checkpoint ckptavg can read (expected safetensors or a torch.save "
        f"file such as {', '.join(TORCH_SUFFIXES[:4])}); check the file"
    )


def open_checkpoint(
    path: str | os.PathLike, key: str | None = None, strip_prefix: str | None = None
) -> Reader:
    """Open a checkpoint for streaming reads.

    Args:
        path: a safetensors file, a sharded safetensors folder, or a torch.save file.
        key: for torch files, the entry that holds the state dict (e.g. "state_dict_ema").
        strip_prefix: a key prefix to remove (e.g. Lightning's "model.").

    Returns:
        A `Reader`. Close it when done (or use it as a context manager).
    """
    path = os.fspath(path)
    kind = sniff(path)
    if kind.startswith("safetensors"):
        from ckptavg.io.safetensors import SafetensorsReader

        return SafetensorsReader(path, strip_prefix=strip_prefix)
    from ckptavg.io.pt import TorchReader

    return TorchReader(path, key=key, strip_prefix=strip_prefix, mmap=kind == "torch-zip")


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """Equal for two names of one tensor (same storage, offset, shape, strides, dtype);
    None for empty tensors, which share nothing."""
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def find_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first earlier name that is the same tensor."""
    seen: dict[tuple, str] = {}
    ties = {}
    for name, t in tensors.items():
        ident = tensor_identity(t)
        if ident is None:
            continue
        if ident in seen:
            ties[name] = seen[ident]
        else:
            seen[ident] = name
    return ties


def clean_metadata(meta: object) -> dict[str, str]:
    """Keep a metadata map only if it is str -> str (values JSON-encoded otherwise)."""
    if not isinstance(meta, dict):
        return {}
    out = {}
    for k, v in meta.items():
        if not isinstance(k, str):
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v)
    return out


class ReaderBase:
    """Shared bookkeeping: public names, context manager."""

    path: str
    format: str
    _names: dict[str, str]

    def keys(self) -> list[str]:
        return list(self._names)

    def _raw(self, key: str) -> str:
        try:
            return self._names[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def release(self, key: str) -> None:
        return None

    def ties(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
