"""Checkpoint folders: a local folder's listing and side files (`Folder`), Hugging Face
index files and shards (`read_index`, `place_shard`, `check_index_complete`, `Sharded`),
DCP folders told by their files, and a Trainer's `trainer_state.json` (epoch, step,
tokens seen)."""

from __future__ import annotations

import json
import os

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError
from ckptavg.io.files import Extent, OpenFile, SourceFile
from ckptavg.io.metadata import Position, clean_metadata, whole_number

if TYPE_CHECKING:
    import torch


INDEX_NAME = "model.safetensors.index.json"


BIN_INDEX_NAME = "pytorch_model.bin.index.json"  # Hugging Face's sharded torch layout


BIN_NAME = "pytorch_model.bin"


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's plan, beside its *.distcp files


def is_dcp_folder(path) -> bool:
    """A torch.distributed.checkpoint folder (told by its files: no torch needed); `path`
    is a folder's path or a Folder."""
    folder = path if isinstance(path, Folder) else Folder(path)
    return folder.has(DCP_METADATA) and any(n.endswith(".distcp") for n in folder.names())


class Folder:
    """A folder of checkpoint files on local disk. A folder in remote storage
    (remote.RemoteFolder) answers the same calls, so the folder formats (sharded
    safetensors, Hugging Face .bin folders, DCP) read either."""

    remote = False

    def __init__(self, path: str):
        self.path = path

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        """Whether the folder holds a file `name`."""
        return os.path.isfile(self.join(name))

    def names(self) -> list[str]:
        return sorted(os.listdir(self.path))

    def open(self, name: str) -> tuple[OpenFile, SourceFile]:
        """The file `name`, opened once (`open_source`)."""
        return OpenFile.of(self.join(name))

    def read(self, name: str, limit: int) -> bytes:
        """The whole of a small file of the folder (an index, metadata); a larger one than
        `limit` is refused in one line."""
        f, src = self.open(name)
        try:
            if src.size > limit:
                raise CheckpointError(f"{src.path}: {src.size} bytes; refused (a {name} is "
                                      f"at most {limit} bytes)")
            return f.get(0, src.size)
        finally:
            f.close()

    def side_file(self, name: str, limit: int) -> bytes | None:
        """A side file's bytes (config.json, trainer_state.json): None when it is absent,
        a link, or larger than `limit`."""
        p = self.join(name)
        if not os.path.isfile(p) or os.path.islink(p) or os.path.getsize(p) > limit:
            return None
        try:
            with open(p, "rb") as f:
                return f.read(limit + 1)
        except OSError:
            return None


TRAINER_STATE = "trainer_state.json"  # Hugging Face Trainer's checkpoint-STEP/ record


MAX_SIDE_FILE = 16 << 20


SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
              "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
              "preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def trainer_state_position(folder: Folder) -> Position:
    """Epoch, step and tokens seen (`num_input_tokens_seen`, which the Trainer records with
    `include_num_input_tokens_seen`) from a Hugging Face `trainer_state.json` in `folder`."""
    raw = folder.side_file(TRAINER_STATE, MAX_SIDE_FILE)
    try:
        state = json.loads(raw) if raw is not None else None
    except (ValueError, RecursionError):
        return Position()
    if not isinstance(state, dict):
        return Position()
    epoch, step = whole_number(state.get("epoch")), whole_number(state.get("global_step"))
    tokens = whole_number(state.get("num_input_tokens_seen"))
    tokens = tokens if tokens is not None and tokens >= 0 else None
    where = f"{TRAINER_STATE} {{}}"
    return Position(epoch, step, where.format("epoch") if epoch is not None else "",
                    where.format("global_step") if step is not None else "",
                    tokens, where.format("num_input_tokens_seen") if tokens is not None else "")


def read_index(folder: Folder, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(tensor name -> shard file name, metadata) of the Hugging Face index file `name` of
    `folder`, checked: every shard is a plain file name in the index's folder."""
    index_path = folder.join(name)
    try:
        index = json.loads(folder.read(name, MAX_SIDE_FILE).decode("utf-8"))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{index_path}: corrupt index (not JSON)") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: corrupt index (no weight_map)")
    for k, v in weight_map.items():
        if not isinstance(v, str) or os.path.basename(v) != v or v in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: tensor {k!r} maps to {v!r}, not a shard file "
                                  "name in the folder; the index is corrupt")
    meta = clean_metadata(index.get("metadata") or {})
    meta.pop("total_size", None)
    return weight_map, meta


def place_shard(where: dict, names, holder, file: str, expected: dict[str, str] | None,
                path_of) -> None:
    """Record that shard `file` (`holder`) holds tensors `names`, checked against the other
    shards (`where`, name -> holder; `path_of(holder)` names one) and the index (`expected`,
    name -> shard file name)."""
    for raw in names:
        if raw in where:
            raise CheckpointError(f"{file}: tensor {raw!r} is also in {path_of(where[raw])}; "
                                  "the folder is corrupt")
        if expected is not None and expected.get(raw) != os.path.basename(file):
            raise CheckpointError(f"{file}: holds tensor {raw!r} that the index does not "
                                  "place in this shard; the folder is corrupt")
        where[raw] = holder


def check_index_complete(index_path: str, weight_map: dict[str, str], where: dict) -> None:
    """Every tensor the index lists was found in its shard."""
    missing = [k for k in weight_map if k not in where]
    if missing:
        raise CheckpointError(f"{index_path}: lists tensor {missing[0]!r} in "
                              f"{weight_map[missing[0]]}, which does not hold it; "
                              "the folder is incomplete")


class Sharded:
    """Mixin for readers made of shards: `_where` maps each raw name to the shard object that
    holds it, which offers read(raw), release(raw) and release_range(raw, start, nbytes)."""

    _where: dict

    def read(self, key: str) -> torch.Tensor:
        raw = self._raw(key)
        return self._where[raw].read(raw)

    def read_raw(self, raw: str) -> torch.Tensor:
        """A tensor by the name it is stored under (no prefix stripped): for files ckptavg
        staged itself, whose names are already the output's."""
        return self._where[raw].read(raw)

    def locate(self, key: str) -> Extent | None:
        raw = self._raw(key)
        return self._where[raw].locate(raw)

    def release(self, key: str) -> None:
        raw = self._raw(key)
        self._where[raw].release(raw)

    def release_range(self, key: str, start: int, nbytes: int) -> None:
        raw = self._raw(key)
        self._where[raw].release_range(raw, start, nbytes)
