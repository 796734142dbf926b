"""torch.distributed.checkpoint (DCP) folders, as FSDP and `dcp.save` write them: a pickled
`.metadata` and one or more `*.distcp` files holding each tensor chunk as a torch.save blob.

Read without a process group, tensor by tensor: a tensor's chunks (one per rank that held a
shard of it) are loaded weights-only from their byte ranges and placed at their offsets.
`.metadata` is a pickle: it is read with an unpickler that admits only DCP's own metadata
classes, torch dtypes/sizes and pathlib paths. Nested state dicts are flattened by DCP; the
weights are the entry `state_dict`, `model`, ... (as in a torch file), or `--key`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings

import torch

from ckptavg.errors import CheckpointError
from ckptavg.io.atomic import fsync_dir, temp_folder_beside, write_error
from ckptavg.io.base import ReaderBase, TensorSpec
from ckptavg.io.files import OpenFile
from ckptavg.io.folders import DCP_METADATA as METADATA
from ckptavg.io.folders import Folder
from ckptavg.io.keys import STATE_DICT_KEYS, strip_keys
from ckptavg.io.writer import ShardedWriter

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    _DCP + "metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                        "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                        "StorageMeta", "_MEM_FORMAT_ENCODING"},
    _DCP + "filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                               torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def _read_metadata(folder: Folder):
    file = folder.join(METADATA)
    f, src = folder.open(METADATA)
    try:
        raw = f.get(0, src.size)
    finally:
        f.close()
    try:
        meta = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused to unpickle {str(e).replace('GLOBAL ', 'the global ')}"
                              " (DCP metadata holds only DCP's own classes)") from None
    except Exception as e:  # a truncated or garbled pickle
        raise CheckpointError(f"{file}: corrupt DCP metadata ({type(e).__name__})") from None
    if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
        raise CheckpointError(f"{file}: not DCP metadata")
    return meta, src


class DCPReader(ReaderBase):
    """A torch.distributed.checkpoint folder, on local disk or in remote storage (`folder`:
    a remote.RemoteFolder; chunks are then read with ranged GETs)."""

    format = "dcp"

    def __init__(self, path: str, key: str | None = None, strip_prefix: str | None = None,
                 folder: Folder | None = None):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self.folder = folder or Folder(path)
        self._open_files: dict[str, OpenFile] = {}
        meta, meta_src = _read_metadata(self.folder)
        self.files = [meta_src]
        try:
            tensors = {fqn: m for fqn, m in meta.state_dict_metadata.items()
                       if isinstance(m, TensorStorageMetadata)}
            self._chunks: dict[str, list] = {fqn: [] for fqn in tensors}
            for index, info in meta.storage_data.items():
                if index.fqn in self._chunks:
                    if getattr(info, "transform_descriptors", None):
                        raise CheckpointError(f"{path}: tensor {index.fqn!r} is stored "
                                              "transformed (compressed); ckptavg reads plain DCP")
                    self._chunks[index.fqn].append((index.offset, self._open(info.relative_path),
                                                    info.offset, info.length))
            planner = getattr(meta, "planner_data", None) or {}
            wanted, self.location = _weights_entry(tensors, planner, key, path)
            self._meta_of = {public: tensors[fqn] for public, fqn in wanted.items()}
            self._fqn = wanted
            self._names, removed = strip_keys(list(wanted), strip_prefix, path)
            self.removed_prefixes = tuple(removed)
            self.other_entries = tuple(sorted({tuple(planner.get(f, (f,)))[0] for f in tensors
                                               if f not in wanted.values()}))
        except BaseException:
            self.close()
            raise

    def _open(self, relative: str) -> tuple[OpenFile, str]:
        if os.path.basename(relative) != relative or relative in ("", ".", ".."):
            raise CheckpointError(f"{self.path}: DCP metadata names {relative!r}, not a file in "
                                  "the folder; the checkpoint is corrupt")
        file = self.folder.join(relative)
        if file not in self._open_files:
            f, src = self.folder.open(relative)
            self._open_files[file] = f
            self.files.append(src)
        return self._open_files[file], file

    def info(self, key: str) -> TensorSpec:
        m = self._meta_of[self._raw(key)]
        return TensorSpec(key, tuple(m.size), m.properties.dtype)

    def read(self, key: str) -> torch.Tensor:
        raw = self._raw(key)
        m, fqn = self._meta_of[raw], self._fqn[raw]
        out = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        covered = 0
        for offsets, (f, file), start, length in self._chunks[fqn]:
            blob = f.get(start, length)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    chunk = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{file}: chunk of {fqn!r} at byte {start} cannot be "
                                      f"loaded ({type(e).__name__}); the checkpoint is corrupt") from None
            if not isinstance(chunk, torch.Tensor) or chunk.dtype != out.dtype or \
                    chunk.dim() != out.dim():
                raise CheckpointError(f"{file}: chunk of {fqn!r} is not a {out.dtype} tensor of "
                                      f"{out.dim()} dims; the checkpoint is corrupt")
            view = out
            for d, (o, n) in enumerate(zip(offsets, chunk.shape)):
                if o + n > out.shape[d]:
                    raise CheckpointError(f"{file}: chunk of {fqn!r} lies outside the tensor")
                view = view.narrow(d, o, n)
            view.copy_(chunk)
            covered += chunk.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.path}: the chunks of {fqn!r} cover {covered} of "
                                  f"{out.numel()} values; the checkpoint is incomplete")
        return out

    def metadata(self) -> dict[str, str]:
        return read_side_metadata(self.folder)

    def close(self) -> None:
        for f in self._open_files.values():
            f.close()
        self._open_files = {}


def _weights_entry(tensors: dict, planner: dict, key: str | None,
                   path: str) -> tuple[dict[str, str], str]:
    """(public name -> DCP fqn, entry): the weights among DCP's flattened entries."""
    paths = {fqn: tuple(planner.get(fqn, (fqn,))) for fqn in tensors}
    tops = {p[0] for p in paths.values() if len(p) > 1}
    if key is None and not tops:
        return {fqn: fqn for fqn in tensors}, "<top level>"
    entry = key if key is not None else next((k for k in STATE_DICT_KEYS if k in tops), None)
    if entry is None or entry not in tops:
        raise CheckpointError(f"{path}: no entry {entry or 'holding the weights'!r} among the "
                              f"DCP entries {', '.join(sorted(tops)) or '(none)'}; name one (--key)")
    return {".".join(map(str, p[1:])): fqn for fqn, p in paths.items()
            if p[0] == entry and len(p) > 1}, entry


# ------------------------------------------------------------------------------- writing

SIDE_METADATA = "ckptavg.json"  # our str -> str metadata map; DCP has no place for it
MAX_SIDE_METADATA = 1 << 20


def read_side_metadata(folder: Folder) -> dict[str, str]:
    """The metadata map ckptavg wrote beside a DCP checkpoint (absent: none). JSON only:
    nothing in it is run."""
    import json

    file = folder.join(SIDE_METADATA)
    if not folder.has(SIDE_METADATA):
        return {}
    raw = folder.read(SIDE_METADATA, MAX_SIDE_METADATA)
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{file}: not JSON; the checkpoint's metadata is corrupt") from None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise CheckpointError(f"{file}: not a map of strings to strings")
    return meta


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception a library wrapped it in (DCP's CheckpointException
    keeps each rank's failure in `failures`), or None."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) and f else getattr(f, "exc", f)
                      for f in failures.values()]  # (exception, traceback) pairs
        stack += [x.__cause__, x.__context__]
    return None


def save_dcp(state: dict[str, torch.Tensor], folder: str, entry: str | None,
             metadata: dict[str, str] | None, distributed: bool) -> None:
    """`torch.distributed.checkpoint.save` of `state` (under `entry`, or at the top level)
    into `folder`; a failed write is raised as its OSError. With `distributed`, every rank of the default process group calls it with
    its own keys (a collective: together they make one checkpoint); `metadata` is written by
    the caller that passes it (rank 0)."""
    import json

    import torch.distributed.checkpoint as dcp

    tree = {entry: state} if entry else state
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tree, storage_writer=dcp.FileSystemWriter(folder), no_dist=not distributed)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        cause = _os_error_in(e)
        if cause is None:
            raise
        raise cause from None  # a full disk inside DCP's writer: the callers' one line
    if metadata is not None:
        with open(os.path.join(folder, SIDE_METADATA), "w") as f:
            json.dump(metadata, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def commit_dcp(tmp: str, path: str) -> None:
    """Swap a finished DCP folder in for `path`, which may be absent or an empty folder."""

    os.chmod(tmp, 0o755)
    if os.path.isdir(path):
        os.rmdir(path)  # empty: checked before any work (check_output), OSError otherwise
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def staged_state(staging: str, weight_map: dict[str, str], order: list[str],
                 ties: dict[str, str]):
    """The tensors that safetensors shards in `staging` hold (`weight_map`: name -> shard),
    in `order`, mapped from their files rather than held in memory, while the block runs;
    `ties` (name -> the name it shares storage with) are shared again where both are here."""
    from ckptavg.io.safetensors import SafetensorsReader

    readers: dict = {}
    try:
        for name in sorted(set(weight_map.values())):
            readers[name] = SafetensorsReader(os.path.join(staging, name))
        state = {k: readers[weight_map[k]].read_raw(k) for k in order}
        for k, v in ties.items():
            if k in state and v in state:
                state[k] = state[v]
        yield state
    finally:
        for r in readers.values():
            r.close()


class DcpWriter(ShardedWriter):
    """A torch.distributed.checkpoint folder (what `dcp.load` and FSDP read), with ckptavg's
    metadata beside it in ckptavg.json.

    The tensors are reduced into safetensors shards of 1 GiB in the output's staging folder
    (`.NAME.ckptavg-partial`, as a folder output's: a failed or killed run keeps the
    finished ones, which `--resume` checks and continues). When all are done, one
    `dcp.save` writes the checkpoint from the shards, mapped rather than held in memory,
    into a temporary folder that is swapped in; then the staging folder goes. The disk holds
    the output twice for the moment of the save."""

    STAGE_SHARD = 1 << 30

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 ties: dict[str, str] | None, entry: str | None, run: dict,
                 resume: bool = False, group=None):
        self._order = [s.key for s in specs]
        self._ties, self._entry = dict(ties or {}), entry
        super().__init__(path, specs, metadata, self.STAGE_SHARD, None,
                         {**run, "output": "dcp", "entry": entry}, resume, group)

    def _commit(self, weight_map: dict[str, str]) -> None:
        tmp = temp_folder_beside(self.path)
        try:
            with staged_state(self._tmp, weight_map, self._order, self._ties) as state:
                save_dcp(state, tmp, self._entry, self._metadata, distributed=False)
            commit_dcp(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self._tmp, ignore_errors=True)  # the staged shards: now in the output

    def _commit_ranks(self, weight_map: dict[str, str]) -> None:
        """Under torchrun: one collective `dcp.save` in which every rank writes the tensors of
        its own staged shard and rank 0 the metadata, into a temporary folder rank 0 makes
        and then swaps in; the staged shards go after. A failure on any rank removes the
        temporary folder and stops every rank with the same line."""
        group = self.group
        mine = [s.key for name, shard in zip(self._names, self._shards) if name in self._mine
                for s in shard]
        tmp = group.on_rank0(lambda: temp_folder_beside(self.path))
        try:
            with contextlib.ExitStack() as stack:
                state, error = {}, None
                try:
                    state = stack.enter_context(staged_state(
                        self._tmp, {k: weight_map[k] for k in mine}, mine, self._ties))
                except BaseException as e:
                    error = e
                group.agree(error)
                try:  # a collective: every rank writes its own tensors, rank 0 the metadata
                    save_dcp(state, tmp, self._entry, self._metadata if group.rank == 0
                             else None, distributed=True)
                except OSError as e:  # a full disk inside DCP's writer: one line
                    raise write_error(self._shown, e) from None
            group.on_rank0(lambda: commit_dcp(tmp, self.path), share=False)
        except BaseException:
            if group.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if group.rank == 0:
            shutil.rmtree(self._tmp, ignore_errors=True)  # the staged shards: in the output
