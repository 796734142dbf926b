"""Atomic, streaming output.

Every writer writes into a temporary file (or folder) beside the target and renames it
into place only after everything has been written and fsync'd: an interrupted run leaves
the old output or none, never a partial one. The safetensors writers take tensors one at
a time in the order announced up front, so memory never holds the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from ckptavg.errors import OutputError
from ckptavg.io.reader import INDEX_NAME, TORCH_SUFFIXES

SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def output_kind(path: str, shard_size: int | None = None) -> str:
    """'safetensors', 'sharded' or 'torch' from the output path."""
    lower = path.lower()
    if lower.endswith(TORCH_SUFFIXES):
        if shard_size:
            raise OutputError(f"{path}: --shard-size writes a folder; give a folder name, not a torch file")
        return "torch"
    if lower.endswith(SAFETENSORS_SUFFIX):
        if shard_size:
            raise OutputError(
                f"{path}: --shard-size writes a folder of shards; drop the .safetensors suffix"
            )
        return "safetensors"
    if os.path.isfile(path):
        raise OutputError(f"{path}: exists and is not a folder; pick a .safetensors or .pt name")
    if shard_size or path.endswith(os.sep) or os.path.isdir(path) or not os.path.splitext(path)[1]:
        return "sharded"
    raise OutputError(
        f"{path}: unknown output suffix; use .safetensors, .pt (or .pth/.bin/.ckpt), or a folder"
    )


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (little-endian, C order)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class AtomicFile:
    """A temporary file beside `path`, renamed over it on commit, removed on abort."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise OutputError(f"{path}: folder {folder} does not exist; create it first")
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                        dir=folder)
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    from ckptavg.io.safetensors import CODES

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        if s.dtype not in CODES:
            raise OutputError(f"tensor {s.key!r}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.key] = {"dtype": CODES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Streams tensors into one safetensors file, in the order given by `specs`."""

    keeps_tensors = False

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str]):
        self.path = path
        self._specs = list(specs)
        self._next = 0
        self._out = AtomicFile(path)
        try:
            self._out.file.write(safetensors_header(self._specs, metadata))
        except BaseException:
            self._out.abort()
            raise
        self.bytes_written = sum(s.nbytes for s in self._specs)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self._specs[self._next]
        if key != spec.key or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"writer expected {spec}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        self._out.file.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._specs):
            raise RuntimeError(f"{self.path}: {len(self._specs) - self._next} tensors not written")
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()


def split_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class ShardedWriter:
    """A folder of safetensors shards plus model.safetensors.index.json (Hugging Face layout)."""

    keeps_tensors = False

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 shard_size: int):
        self.path = os.path.abspath(path.rstrip(os.sep))
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise OutputError(f"{path}: folder {parent} does not exist; create it first")
        self._tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp",
                                     dir=parent)
        self._shards = split_shards(list(specs), shard_size)
        n = len(self._shards)
        self._names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._metadata = dict(metadata)
        self._current: SafetensorsWriter | None = None
        self._shard = -1
        self._left = 0
        self.bytes_written = sum(s.nbytes for s in specs)

    def _open_next(self) -> None:
        if self._current is not None:
            self._current.close()
        self._shard += 1
        shard_meta = {**self._metadata, "format": "pt"}
        self._current = SafetensorsWriter(os.path.join(self._tmp, self._names[self._shard]),
                                          self._shards[self._shard], shard_meta)
        self._left = len(self._shards[self._shard])

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._open_next()
        self._current.write(key, tensor)
        self._left -= 1

    def close(self) -> None:
        while self._shard + 1 < len(self._shards):  # empty model: still write the shard
            self._open_next()
        if self._current is not None:
            self._current.close()
        weight_map = {s.key: self._names[i] for i, shard in enumerate(self._shards) for s in shard}
        index = {"metadata": {"total_size": self.bytes_written, **self._metadata},
                 "weight_map": weight_map}
        index_path = os.path.join(self._tmp, INDEX_NAME)
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(self._tmp, 0o755)
        old = None
        if os.path.isdir(self.path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", suffix=".old",
                                   dir=os.path.dirname(self.path))
            os.rename(self.path, os.path.join(old, "x"))
        os.rename(self._tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)


class TorchWriter:
    """`{"state_dict": ..., "metadata": ...}` through torch.save; holds the model until close."""

    keeps_tensors = True

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 ties: dict[str, str] | None = None):
        self.path = path
        self._order = [s.key for s in specs]
        self._ties = dict(ties or {})
        self._state: dict[str, torch.Tensor] = {}
        self._metadata = dict(metadata)
        self._out = AtomicFile(path)
        self.bytes_written = sum(s.nbytes for s in specs if s.key not in self._ties)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._state[key] = tensor

    def close(self) -> None:
        state = {}
        for k in self._order:
            # Tied names point at one tensor object, so torch.save stores one storage.
            state[k] = state[self._ties[k]] if k in self._ties else self._state[k]
        try:
            torch.save({"state_dict": state, "metadata": self._metadata}, self._out.file)
        except BaseException:
            self._out.abort()
            raise
        self._state.clear()
        self._out.commit()

    def abort(self) -> None:
        self._state.clear()
        self._out.abort()


def make_writer(path: str, specs: list[TensorSpec], metadata: dict[str, str],
                shard_size: int | None = None, ties: dict[str, str] | None = None):
    """The writer that the output path's suffix asks for."""
    kind = output_kind(path, shard_size)
    if kind == "torch":
        return TorchWriter(path, specs, metadata, ties)
    if kind == "sharded":
        return ShardedWriter(path, specs, metadata, shard_size or 5 * 10**9)
    return SafetensorsWriter(path, specs, metadata)
