"""safetensors files and sharded folders, read through a private memory map.

The header is parsed here (8-byte little-endian length, then JSON). A tensor is a view of
the mapped file (no copy); after use its pages are dropped with madvise(MADV_DONTNEED), so
nothing stays resident, whatever the number of inputs.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch

from ckptavg.errors import CheckpointError
from ckptavg.io.reader import INDEX_NAME, ReaderBase, TensorInfo, clean_metadata, strip_keys

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, offset where the data buffer starts)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header past end)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    base = 8 + n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        start, end = v["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {k!r} past end)")
    return header, base


class SafetensorsReader(ReaderBase):
    format = "safetensors"

    def __init__(self, path: str, strip_prefix: str | None = None):
        self.path = path
        # raw key -> (file, dtype, shape, absolute start, nbytes)
        self._entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        if os.path.isdir(path):
            index_path = os.path.join(path, INDEX_NAME)
            if os.path.exists(index_path):
                self.format = "safetensors-sharded"
                files, meta = self._read_index(index_path)
            else:
                files, meta = [os.path.join(path, "model.safetensors")], None
        else:
            files, meta = [path], None
        shard_meta: dict[str, str] = {}
        for file in files:
            header, base = read_header(file)
            if not shard_meta:
                shard_meta = clean_metadata(header.get("__metadata__"))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                code = v.get("dtype")
                if code not in DTYPES:
                    raise CheckpointError(f"{file}: tensor {k!r} has dtype {code} that torch cannot hold")
                start, end = v["data_offsets"]
                self._entries[k] = (file, DTYPES[code], tuple(v["shape"]), base + start, end - start)
        self._meta = meta if meta is not None else shard_meta
        self._names = strip_keys(list(self._entries), strip_prefix, path)
        self._files = files
        self._maps: dict[str, mmap.mmap] = {}

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it: the map closes when that goes
                pass
        self._maps.clear()

    def _read_index(self, index_path: str) -> tuple[list[str], dict[str, str]]:
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: corrupt index (no weight_map)") from None
        folder = os.path.dirname(index_path)
        files = sorted(set(weight_map.values()))
        meta = clean_metadata(index.get("metadata") or {})
        meta.pop("total_size", None)
        return [os.path.join(folder, f) for f in files], meta

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def info(self, key: str) -> TensorInfo:
        _, dtype, shape, _, _ = self._entries[self._raw(key)]
        return TensorInfo(shape, dtype)

    def read(self, key: str) -> torch.Tensor:
        file, dtype, shape, start, nbytes = self._entries[self._raw(key)]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # A private, never-written map: the tensor aliases the page cache (no copy), and
        # release() drops the pages again, so nothing stays resident.
        data = torch.frombuffer(self._map(file), dtype=torch.uint8, count=nbytes, offset=start)
        return data.view(dtype).view(shape)

    def _map(self, file: str) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:
                m = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return m

    def release(self, key: str) -> None:
        file, _, _, start, nbytes = self._entries[self._raw(key)]
        m = self._maps.get(file)
        if m is None or nbytes == 0 or not hasattr(m, "madvise"):
            return
        lo = start - start % mmap.PAGESIZE
        hi = min(len(m), start + nbytes + (-(start + nbytes)) % mmap.PAGESIZE)
        m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)
