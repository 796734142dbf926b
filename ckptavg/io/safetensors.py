"""safetensors files and sharded folders, validated, then read through a private map.

A header is untrusted: it is bounded, parsed with duplicate names refused, and believed only
if its entries tile the data section exactly and the file is exactly as long as they say.
Each file is opened once; header and data come through that descriptor (the map is made
from it), so a file replaced by another mid-run cannot mix the two. An object in remote
storage is read the same way through a remote.RemoteFile, its tensors with ranged GETs. The averaging
engine reads tensors with pread through that descriptor (kept while the process uses under
half its descriptor limit; past that the file is mapped at once and the descriptor closed).
`read` gives a tensor as a view of a map of the file, made (and torch imported) on first
use; `release` drops its pages, so nothing stays resident.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError
from ckptavg.io.base import ReaderBase, TensorSpec
from ckptavg.io.dtypes import DTYPES
from ckptavg.io.files import (
    ByteSource,
    Extent,
    OpenFile,
    SourceIdentity,
    drop_pages,
    fd_path,
    keep_descriptor,
)
from ckptavg.io.folders import (
    INDEX_NAME,
    Folder,
    Sharded,
    check_index_complete,
    place_shard,
    read_index,
)
from ckptavg.io.keys import AVERAGED_COUNT, is_averaged_model, strip_keys
from ckptavg.lazy import import_torch

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100_000_000  # the safetensors library's own bound


def _bad(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: invalid safetensors header: {what}; the file is corrupt "
                           "or forged: re-save it from the weights")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"name {k!r} appears twice")
        out[k] = v
    return out


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(raw: bytes, data_size: int, path: str) -> tuple[dict, dict[str, str]]:
    """Validate a header: ({raw name: (dtype, shape, begin, nbytes)}, metadata).

    Offsets are relative to the data section, which is `data_size` bytes long."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _bad(path, "nested too deeply") from None
    except UnicodeDecodeError:
        raise _bad(path, "not UTF-8") from None
    except ValueError as e:  # JSONDecodeError, or a duplicate name
        raise _bad(path, str(e).split(":")[0] if "twice" not in str(e) else str(e)) from None
    if not isinstance(header, dict):
        raise _bad(path, "not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "__metadata__ is not a map of strings to strings")
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {name!r} is not a tensor entry")
        code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in DTYPES:
            raise _bad(path, f"tensor {name!r} has unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_count(s) for s in shape):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}, not a list of counts")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}")
        dtype = DTYPES[code]
        spec = TensorSpec(name, tuple(shape), dtype)
        if offsets[1] - offsets[0] != spec.nbytes:
            raise _bad(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape "
                       f"{shape} of {code} needs {spec.nbytes}")
        entries[name] = (dtype, tuple(shape), offsets[0], spec.nbytes)
    end = 0
    for name, (_, _, begin, nbytes) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end:
            what = "overlaps the one before" if begin < end else f"leaves a hole at byte {end}"
            raise _bad(path, f"tensor {name!r} {what}")
        end = begin + nbytes
    if end != data_size:
        raise _bad(path, f"the tensors end at byte {end} of a {data_size}-byte data section"
                   + (" (truncated file)" if end > data_size else " (trailing bytes)"))
    return entries, dict(meta)


def _read_header(file: ByteSource, src: SourceIdentity) -> tuple[dict, dict[str, str], int]:
    """(entries, metadata, where the data section begins) of an open safetensors file, its
    header bounded and validated (`parse_header`)."""
    if src.size < 8:
        raise CheckpointError(f"{src.path}: truncated safetensors file (no header)")
    n = int.from_bytes(file.get(0, 8), "little")
    if n == 0 or n > MAX_HEADER or n > src.size - 8:
        raise _bad(src.path, f"header length {n} for a {src.size}-byte file")
    entries, meta = parse_header(file.get(8, n), src.size - 8 - n, src.path)
    return entries, meta, 8 + n


class _MappedFile:
    """One local safetensors file: validated header, then mapped through the same descriptor
    (when a tensor is first read as a view; the averaging engine reads with pread and never
    maps, nor imports torch)."""

    def __init__(self, file: ByteSource, src: SourceIdentity):
        self.src = src
        self.file: ByteSource | None = None
        self._bytes = None
        try:
            self.entries, self.meta, self.base = _read_header(file, src)
            # The averaging engine reads with pread through this descriptor (io.files.Extent);
            # past half the descriptor limit the file is mapped now and the descriptor closed.
            if keep_descriptor(file.fd):
                self.file = file
            else:
                self._map(file.fd)
        finally:
            if self.file is None:
                file.close()
        if self.file is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # wider read-ahead

    def _map(self, fd: int) -> None:
        # A private, never-written map of the open file (its /proc/self/fd name, so not a
        # path that may since name another file); torch keeps no descriptor for it, where
        # Python's mmap would keep a duplicate per input.
        torch = import_torch()
        storage = torch.UntypedStorage.from_file(fd_path(fd, self.src.path), False,
                                                 self.src.size)
        self._bytes = torch.empty(0, dtype=torch.uint8).set_(storage)

    @property
    def bytes(self) -> torch.Tensor:
        if self._bytes is None:
            if self.file is None:
                raise ValueError(f"{self.src.path}: read after close")
            self._map(self.file.fd)
        return self._bytes

    def read(self, raw: str) -> torch.Tensor:
        dtype, shape, begin, nbytes = self.entries[raw]
        if nbytes == 0:
            return import_torch().empty(shape, dtype=dtype.torch)
        start = self.base + begin
        data = self.bytes[start:start + nbytes]
        if start % dtype.itemsize:  # the format does not promise aligned offsets
            data = data.clone()
        return data.view(dtype.torch).view(shape)

    def number(self, raw: str) -> float:
        """A one-element integer or floating tensor's value (AveragedModel's n_averaged)."""
        dtype, shape, begin, nbytes = self.entries[raw]
        value = None
        if self.file is not None and nbytes == dtype.itemsize:
            value = self.file.number(self.base + begin, dtype)
        return self.read(raw).item() if value is None else value

    def locate(self, raw: str) -> Extent | None:
        if self.file is None:
            return None
        return self.file.extent(self.base + self.entries[raw][2])

    def release(self, raw: str) -> None:
        self.release_range(raw, 0, self.entries[raw][3])

    def release_range(self, raw: str, start: int, nbytes: int) -> None:
        """Drop the mapped pages of bytes [start, start + nbytes) of tensor `raw`; `start`
        may be negative (pages before the tensor: never before the start of the map)."""
        if self._bytes is None:
            return  # never mapped: no pages to drop
        begin = self.entries[raw][2]
        lo = max(self.base + begin + start, 0)
        drop_pages(self._bytes.data_ptr() + lo, self.base + begin + start + nbytes - lo)

    def close(self) -> None:
        self._bytes = None  # unmapped when the last view of it goes
        if self.file is not None:
            self.file.close()
            self.file = None


class _ObjectShard:
    """One safetensors object in remote storage (remote.RemoteFile): validated header, then
    each tensor read in place with ranged GETs, never mapped."""

    def __init__(self, file: ByteSource, src: SourceIdentity):
        self.src, self.file = src, file
        self.entries, self.meta, self.base = _read_header(file, src)

    def read(self, raw: str) -> torch.Tensor:
        torch = import_torch()
        dtype, shape, begin, nbytes = self.entries[raw]
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype.torch)
        data = bytearray(self.file.get(self.base + begin, nbytes))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype.torch).view(shape)

    def number(self, raw: str) -> float:
        dtype, _, begin, nbytes = self.entries[raw]
        value = self.file.number(self.base + begin, dtype) if nbytes == dtype.itemsize else None
        return self.read(raw).item() if value is None else value

    def locate(self, raw: str) -> Extent:
        return self.file.extent(self.base + self.entries[raw][2])

    def release(self, raw: str) -> None:
        return None

    def release_range(self, raw: str, start: int, nbytes: int) -> None:
        return None

    def close(self) -> None:
        self.file.close()


class SafetensorsReader(Sharded, ReaderBase):
    """A safetensors file, a sharded folder (index + shards), or a folder with
    model.safetensors, on local disk or in remote storage. Pass `file`/`src` when the file
    is already open (it is taken over: base.OpenFile, remote.RemoteFile), or the `folder`
    (base.Folder, remote.RemoteFolder); else `path` is opened here."""

    format = "safetensors"

    def __init__(self, path: str, strip_prefix: str | None = None, file: ByteSource | None = None,
                 src: SourceIdentity | None = None, folder: Folder | None = None):
        self.path = path
        self._shards: list[_MappedFile | _ObjectShard] = []
        self._where: dict[str, _MappedFile | _ObjectShard] = {}
        try:
            if file is None and folder is None:
                if os.path.isdir(path):
                    folder = Folder(path)
                else:
                    file, src = OpenFile.of(path)
            if folder is not None:
                self.folder = folder
                self._open_folder(folder)
            else:
                self._add(file, src)
                self._meta = self._shards[0].meta
            if not self._where:
                raise CheckpointError(f"{path}: holds no tensors; nothing to read")
            if is_averaged_model(list(self._where)):
                count = self._where.pop(AVERAGED_COUNT).number(AVERAGED_COUNT)
                self.averaged_count = int(count)
                self._meta = {**self._meta, "swa.n_averaged": str(int(count))}
            self._names, removed = strip_keys(list(self._where), strip_prefix, path)
        except BaseException:
            self.close()
            raise
        self.removed_prefixes = tuple(removed)
        self.files = [m.src for m in self._shards]

    def _open_folder(self, folder: Folder) -> None:
        if not folder.has(INDEX_NAME):
            self._add(*folder.open("model.safetensors"))
            self._meta = self._shards[0].meta
            return
        self.format = "safetensors-sharded"
        weight_map, meta = read_index(folder, INDEX_NAME)
        for name in sorted(set(weight_map.values())):
            self._add(*folder.open(name), expected=weight_map)
        check_index_complete(folder.join(INDEX_NAME), weight_map, self._where)
        self._meta = meta or self._shards[0].meta

    def _add(self, file: ByteSource, src: SourceIdentity, expected: dict | None = None) -> None:
        m = _ObjectShard(file, src) if file.remote else _MappedFile(file, src)
        self._shards.append(m)
        place_shard(self._where, m.entries, m, src.path, expected, lambda other: other.src.path)

    def info(self, key: str) -> TensorSpec:
        raw = self._raw(key)
        dtype, shape, _, _ = self._where[raw].entries[raw]
        return TensorSpec(key, shape, dtype)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        for m in self._shards:
            m.close()
        self._shards = []
