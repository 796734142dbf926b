"""Hugging Face folders of torch files: `pytorch_model.bin`, or shards listed by
`pytorch_model.bin.index.json`. Each shard is a TorchReader (weights-only, mapped, or read
in place with ranged GETs in remote storage); key prefixes are stripped once over the union
of the shards' keys."""

from __future__ import annotations

import os

from ckptavg.io.base import ReaderBase, TensorSpec
from ckptavg.io.folders import (
    BIN_INDEX_NAME,
    BIN_NAME,
    MAX_SIDE_FILE,
    SIDE_FILES,
    Folder,
    Sharded,
    check_index_complete,
    place_shard,
    read_index,
)
from ckptavg.io.keys import strip_keys
from ckptavg.io.pt import TorchReader


class _Stored:
    """A shard's reader addressed by the names stored in its file: the folder strips
    prefixes once over the union of its shards' names, so a shard whose own keys all carry
    `module.` (its reader would unwrap them) still matches the index."""

    def __init__(self, reader: TorchReader):
        self.reader, self.path = reader, reader.path
        self.own = {reader.stored_name(k): k for k in reader.keys()}  # stored -> its key

    def read(self, raw: str):
        return self.reader.read(self.own[raw])

    def locate(self, raw: str):
        return self.reader.locate(self.own[raw])

    def release(self, raw: str) -> None:
        self.reader.release(self.own[raw])

    def release_range(self, raw: str, start: int, nbytes: int) -> None:
        self.reader.release_range(self.own[raw], start, nbytes)


class TorchFolderReader(Sharded, ReaderBase):
    """A folder holding `pytorch_model.bin` or an index and its `.bin` shards."""

    format = "torch-folder"

    def __init__(self, path: str, strip_prefix: str | None = None, folder: Folder | None = None):
        self.path = path
        self.folder = folder or Folder(path)
        self._shards: list[_Stored] = []
        self._where: dict[str, _Stored] = {}
        try:
            self._open(self.folder)
            self._names, removed = strip_keys(list(self._where), strip_prefix, path)
        except BaseException:
            self.close()
            raise
        self.removed_prefixes = tuple(removed)
        self.files = [f for s in self._shards for f in s.reader.files]
        # Ties lie within a shard (one torch file): each shard's own, by the folder's names,
        # found from the files' descriptions without reading any tensor.
        public = {raw: key for key, raw in self._names.items()}
        self._ties = {public[s.reader.stored_name(k)]: public[s.reader.stored_name(v)]
                      for s in self._shards for k, v in s.reader.ties().items()}

    def _open(self, folder: Folder) -> None:
        if not folder.has(BIN_INDEX_NAME):
            self._add(folder, BIN_NAME, None)
            self._meta = {}
            return
        self.format = "torch-sharded"
        weight_map, self._meta = read_index(folder, BIN_INDEX_NAME)
        for name in sorted(set(weight_map.values())):
            self._add(folder, name, weight_map)
        check_index_complete(folder.join(BIN_INDEX_NAME), weight_map, self._where)

    def _add(self, folder: Folder, name: str, expected: dict | None) -> None:
        file, src = folder.open(name)
        shard = _Stored(TorchReader(src.path, strip_prefix=None, file=file, src=src))
        self._shards.append(shard)
        place_shard(self._where, shard.own, shard, src.path, expected, lambda other: other.path)

    def info(self, key: str) -> TensorSpec:
        raw = self._raw(key)
        shard = self._where[raw]
        spec = shard.reader.info(shard.own[raw])
        return TensorSpec(key, spec.shape, spec.dtype)

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        for s in self._shards:
            s.reader.close()
        self._shards = []


def side_files(readers: list[ReaderBase]) -> tuple[dict[str, bytes], list[str]]:
    """The model-folder files (config.json, tokenizer files) of folder inputs, for a folder
    output: the newest input's copy of each, with a warning naming any that differ."""
    found: dict[str, list[bytes]] = {}
    for r in readers:
        folder = r.folder or (Folder(r.path) if os.path.isdir(r.path) else None)
        if folder is None or folder.path != r.path:
            continue  # a file input: the files beside it are not a model folder's
        for name in SIDE_FILES:
            data = folder.side_file(name, MAX_SIDE_FILE)
            if data is not None:
                found.setdefault(name, []).append(data)
    notes = [f"{name} differs between the input folders; the newest input's copy was taken"
             for name, copies in found.items() if len(set(copies)) > 1]
    return {name: copies[-1] for name, copies in found.items()}, notes
