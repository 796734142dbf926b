"""Hugging Face folders of torch files: `pytorch_model.bin`, or shards listed by
`pytorch_model.bin.index.json`. Each shard is a TorchReader (weights-only, mapped, or read
in place with ranged GETs in remote storage); key prefixes are stripped once over the union
of the shards' keys."""

from __future__ import annotations

import os

from ckptavg.io.base import (
    BIN_INDEX_NAME,
    BIN_NAME,
    MAX_SIDE_FILE,
    SIDE_FILES,
    Folder,
    ReaderBase,
    Sharded,
    TensorSpec,
    check_index_complete,
    find_ties,
    place_shard,
    read_index,
    strip_keys,
)
from ckptavg.io.pt import TorchReader


class TorchFolderReader(Sharded, ReaderBase):
    """A folder holding `pytorch_model.bin` or an index and its `.bin` shards."""

    format = "torch-folder"

    def __init__(self, path: str, strip_prefix: str | None = None, folder: Folder | None = None):
        self.path = path
        self.folder = folder or Folder(path)
        self._shards: list[TorchReader] = []
        self._where: dict[str, TorchReader] = {}
        try:
            self._open(self.folder)
            self._names, removed = strip_keys(list(self._where), strip_prefix, path)
        except BaseException:
            self.close()
            raise
        self.removed_prefixes = tuple(removed)
        self.files = [f for r in self._shards for f in r.files]
        self._ties = find_ties({k: self._where[raw].read(raw) for k, raw in self._names.items()})

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
        r = TorchReader(src.path, strip_prefix=None, file=file, src=src)
        self._shards.append(r)
        place_shard(self._where, r.keys(), r, src.path, expected, lambda other: other.path)

    def info(self, key: str) -> TensorSpec:
        raw = self._raw(key)
        spec = self._where[raw].info(raw)
        return TensorSpec(key, spec.shape, spec.dtype)

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        for r in self._shards:
            r.close()
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
