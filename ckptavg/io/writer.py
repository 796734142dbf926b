"""Atomic, streaming output that never replaces what is not ours.

Every writer writes into a temporary file (or folder) beside the target and renames it
into place only after everything has been written and fsync'd (in object storage: a
multipart upload per file, completed last, `output_file`): an interrupted or failed run
leaves the old output or none, never a partial one, and no temporary file. Writers are
context managers: a clean exit commits, an exception aborts. The safetensors writers take
tensors one at a time in the order announced up front, so memory never holds the model.

Before anything is written, `check_output` refuses an output that is (or, for a folder,
contains) a file of an input, and a folder output that holds anything but an earlier
sharded output of ours.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import json
import os
import queue
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from ckptavg.errors import OptionError, OutputError
from ckptavg.io import remote
from ckptavg.io.atomic import (
    Atomic,
    AtomicFile,
    fsync_dir,
    temp_folder_beside,
    write_error,
)
from ckptavg.io.base import TORCH_SUFFIXES, TensorSpec
from ckptavg.io.dtypes import CODES
from ckptavg.io.files import SourceFile
from ckptavg.io.folders import INDEX_NAME, SIDE_FILES
from ckptavg.io.remote import is_remote
from ckptavg.io.torchzip import (
    BareState,
    Pickle,
    RawTensor,
    TensorRecord,
    ZipStream,
    head_records,
    tail_records,
)
from ckptavg.lazy import import_torch

if TYPE_CHECKING:
    pass

SAFETENSORS_SUFFIX = ".safetensors"


# Non-weight files of a Hugging Face model folder, copied into a folder output so that
# `from_pretrained(output)` works. Only these names, never code or training state.
SIDE_FILES_KEY = "ckptavg.side_files"


def output_kind(path: str, shard_size: int | None = None, dcp: bool = False) -> str:
    """'safetensors', 'sharded', 'torch' or 'dcp' (asked for) from the output path; a path
    that asks for none of them is an OptionError naming the output option."""
    path = remote.local_path(path)
    if dcp:
        if os.path.isfile(path):
            raise OptionError("output", "exists and is not a folder; a DCP checkpoint is a "
                              "folder", path)
        if shard_size:
            raise OptionError(("shard_size", "dcp"), "a shard size is for safetensors "
                              "folders; DCP shards by rank")
        return "dcp"
    lower = path.lower()
    if lower.endswith(TORCH_SUFFIXES):
        if shard_size:
            raise OptionError(("output", "shard_size"), f"a shard size asks for a folder, and "
                              f"{path} is a torch file; give a folder name")
        return "torch"
    if lower.endswith(SAFETENSORS_SUFFIX):
        if shard_size:
            raise OptionError(("output", "shard_size"), f"a shard size asks for a folder of "
                              f"shards, and {path} is a .safetensors file; drop the suffix")
        return "safetensors"
    if os.path.isfile(path):
        raise OptionError("output", "exists and is not a folder; pick a .safetensors or .pt "
                          "name", path)
    if shard_size or path.endswith(os.sep) or os.path.isdir(path) or not os.path.splitext(path)[1]:
        return "sharded"
    raise OptionError("output", "unknown output suffix; use .safetensors, .pt (or "
                      ".pth/.bin/.ckpt/.tar), or a folder", path)


def _ours(folder: str) -> list[str]:
    """The files of an earlier sharded output in `folder` (index + its shards); raises
    OutputError naming the first thing that is not ours."""
    entries = sorted(os.listdir(folder))
    if not entries:
        return []
    listed: set[str] = set()
    index = os.path.join(folder, INDEX_NAME)
    if INDEX_NAME in entries:
        try:
            with open(index) as f:
                content = json.load(f)
            weight_map = content.get("weight_map", {})
            listed = {v for v in weight_map.values() if isinstance(v, str)}
            side = json.loads(content.get("metadata", {}).get(SIDE_FILES_KEY, "[]"))
            listed |= {n for n in side if isinstance(n, str) and n in SIDE_FILES}
        except (OSError, ValueError, AttributeError, TypeError):
            listed = set()
    for name in entries:
        full = os.path.join(folder, name)
        if name != INDEX_NAME and name not in listed or not os.path.isfile(full) \
                or os.path.islink(full):
            raise OutputError(
                f"{folder}: the output folder holds {full}, which is not part of an earlier "
                "ckptavg output; nothing in it was touched. Pick a new or empty folder"
            )
    return [os.path.join(folder, n) for n in entries]


_REPLACE = contextvars.ContextVar("ckptavg_replace", default=False)
# metadata that marks an output of a ckptavg command (not a training snapshot)
OUTPUT_MARKS = ("average.n", "swag.rank", "bn.samples")


@contextlib.contextmanager
def replacing(allowed: bool = True):
    """Within the block, a file output may replace an existing file that is not an output
    of ckptavg (a training checkpoint, a file of the user's): the CLI's `--overwrite`."""
    token = _REPLACE.set(allowed)
    try:
        yield
    finally:
        _REPLACE.reset(token)


def written_by_ckptavg(path: str) -> bool:
    """Whether the file at `path` is an output of a ckptavg command: a checkpoint whose
    metadata says it was averaged, recalibrated or is a SWAG file. Unreadable: not ours."""
    from ckptavg.errors import CkptavgError
    from ckptavg.io import open_checkpoint

    try:
        with open_checkpoint(path) as r:
            meta = r.metadata()
    except (CkptavgError, OSError):
        return False
    return any(k in meta for k in OUTPUT_MARKS)


def check_output(path: str, kind: str, inputs: Iterable[SourceFile],
                 overwrite: bool | None = None) -> None:
    """Refuse an output that would replace an input's file or anything not ours. An
    existing file is replaced only when it is an output of ckptavg (`written_by_ckptavg`),
    or with `overwrite` (default: the `replacing` context, the CLI's --overwrite)."""
    path = remote.local_path(path)
    if is_remote(path):
        remote.check_output(path, kind, inputs)
        return
    ids = {f.identity: f.path for f in inputs}

    def refuse_if_input(p: str) -> None:
        try:
            st = os.stat(p)
        except OSError:
            return
        other = ids.get((st.st_dev, st.st_ino))
        if other is not None:
            what = "is one of the inputs" if p == path else f"would replace {p}"
            raise OutputError(f"{path}: {what} (the same file as input {other}); nothing was "
                              "written: write the output elsewhere")

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{path}: cannot check the output path ({e.strerror})") from None
    if kind == "dcp":
        if not stat.S_ISDIR(st.st_mode) or os.listdir(path):
            raise OutputError(f"{path}: exists and is not an empty folder; a DCP output goes "
                              "to a new or empty folder (nothing was touched)")
        return
    if kind == "sharded":
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: exists and is not a folder; pick another name")
        refuse_if_input(path)
        for f in _ours(path):
            refuse_if_input(f)
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: is a folder; pick a file name (or drop the suffix to "
                          "write a sharded folder)")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: exists and is not a regular file; pick another name")
    refuse_if_input(path)
    if not (_REPLACE.get() if overwrite is None else overwrite) and not written_by_ckptavg(path):
        raise OutputError(f"{path}: exists and is not an output of ckptavg (a training "
                          "checkpoint, or a file of yours); nothing was written: pick another "
                          "name, or pass --overwrite to replace it")


def output_file(path: str, size: int) -> AtomicFile:
    """Where a file output's bytes go as they are written: a temporary file beside `path`,
    renamed over it on commit; in object storage, a multipart upload that becomes the object
    on commit (remote.Upload). `size`: about how many bytes will be written."""
    if is_remote(path):
        return remote.Upload(path, size)
    return AtomicFile(path)


def as_array(t) -> np.ndarray:
    """The one array type every writer takes: a tensor's raw bytes (little-endian, C order)
    as a flat numpy uint8 array. A numpy array (the engine's output, already the raw bytes of
    the spec's dtype) is viewed as it is; a torch tensor is made contiguous on the CPU and
    viewed without a copy. This is the only place the two are told apart."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(np.uint8)
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return np.empty(0, np.uint8)
    return t.reshape(-1).view(import_torch().uint8).numpy()


def _fits(data: np.ndarray, spec: TensorSpec) -> bool:
    return data.nbytes == spec.nbytes


class Writer(Atomic, abc.ABC):
    """Base of the writers: a context manager that commits on success, aborts on error,
    and turns a failing disk into one OutputError naming the output."""

    # Declared capabilities, read by the engine (never probed with hasattr):
    shares_ties = False  # tied names are one tensor: only the first of each is written
    kept: str | None = None  # after a failure: what was kept for --resume, and how to finish
    notes: tuple[str, ...] | list[str] = ()  # warnings the writer has for the result
    streams_parts = False  # takes a tensor in consecutive flat slices (write_part)

    def write(self, key: str, tensor) -> None:
        """Write one whole tensor: a torch tensor, or its raw bytes as a numpy array."""
        try:
            self._write(key, as_array(tensor))
        except OSError as e:
            raise write_error(self._shown, e) from None

    def write_part(self, key: str, flat, first: bool, last: bool) -> None:
        """Write a tensor in consecutive flat slices (writers with `streams_parts`)."""
        try:
            self._write_part(key, as_array(flat), first, last)
        except OSError as e:
            raise write_error(self._shown, e) from None

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} takes whole tensors")

    def close(self) -> None:
        try:
            self._close()
        except OSError as e:
            raise write_error(self._shown, e) from None

    fills_metadata = False  # takes metadata values computed by the pass (`fill`)

    def recorded(self) -> dict[str, dict]:
        """Digests an earlier run recorded for the parts it finished (a resumed folder)."""
        return {}

    def fill(self, values: dict[str, str]) -> None:
        """Before the commit: put each value in place of its placeholder (a string of the
        same length) in the output's metadata (the content hashes of the read pass)."""
        raise NotImplementedError(f"{type(self).__name__} writes its metadata first")

    @abc.abstractmethod
    def _write(self, key: str, tensor: np.ndarray) -> None:
        """Write one tensor's bytes (`as_array`'s form)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Finish and commit the output."""


class Discard(Writer):
    """Takes every tensor and keeps none: a dry run goes through the read pass (every byte
    read, each torch zip record's CRC-32 checked, NaN/Inf refused, content hashes taken)
    and writes nothing."""

    path = "(dry run: nothing written)"
    streams_parts = True

    def _write(self, key: str, tensor: np.ndarray) -> None:
        return None

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        return None

    def _close(self) -> None:
        return None

    def abort(self) -> None:
        return None


LOOSE_PARTS = 4  # slices in arrays of their own queued for the writer thread, at most


class BackgroundWriter:
    """Runs a writer's `write` on one thread, so that copying a tensor to the file overlaps
    the arithmetic of the next one. The caller takes a free buffer with `buffer()`, fills it
    and hands it over with `write`; the buffer comes back free once written. A write error
    is raised in the caller's thread at the next `buffer()` or at `finish()`. A job may go
    to another writer (`to`): a sweep's outputs share one thread, each written in order."""

    def __init__(self, writer: Writer, buffers: list[np.ndarray]):
        self._writer = writer
        self._free: queue.Queue = queue.Queue()
        for b in buffers:
            self._free.put(b)
        self._jobs: queue.Queue = queue.Queue()
        # slices handed over in arrays of their own (not buffers): a few queued at a time,
        # so that a producer faster than the disk does not pile them up in memory
        self._loose = threading.Semaphore(LOOSE_PARTS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ckptavg-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            writer, key, tensor, buf, part = job
            try:
                if self._error is None:
                    if part is None:
                        writer.write(key, tensor)
                    else:
                        writer.write_part(key, tensor, *part)
            except BaseException as e:
                self._error = e
            finally:
                if buf is not None:
                    self._free.put(buf)
                elif part is not None:
                    self._loose.release()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> np.ndarray:
        self._raise()
        buf = self._free.get()
        self._raise()
        return buf

    def write(self, key: str, tensor: np.ndarray, buf: np.ndarray | None = None,
              part: tuple[bool, bool] | None = None, to: Writer | None = None) -> None:
        """Queue `tensor` (a view of `buf`, or a tensor nobody else changes) for this
        thread's writer or `to`; with `part` (first, last), a flat slice of the tensor (the
        writer must stream parts)."""
        self._raise()
        if buf is None and part is not None:
            self._loose.acquire()
        self._jobs.put((to or self._writer, key, tensor, buf, part))

    def finish(self) -> None:
        """Wait for every queued write; raise the first error."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        if s.key == "__metadata__":
            raise OutputError("a tensor is named '__metadata__', which safetensors reserves; "
                              "rename it, or write a .pt output")
        if s.dtype not in CODES:
            raise OutputError(f"tensor {s.key!r}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.key] = {"dtype": CODES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter(Writer):
    """Streams tensors into one safetensors file, in the order given by `specs`."""

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 shown: str | None = None):
        self.path = path
        self.shown = shown
        self._specs = list(specs)
        self._next = 0
        header = self._header = safetensors_header(self._specs, metadata)
        self._out = output_file(path, len(header) + sum(s.nbytes for s in self._specs))
        self.fills_metadata = not is_remote(path)
        try:
            self._out.file.write(header)
        except OSError as e:
            self._out.abort()
            raise write_error(self._shown, e) from None
        self.bytes_written = sum(s.nbytes for s in self._specs)

    streams_parts = True

    def _write(self, key: str, tensor: np.ndarray) -> None:
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or key != spec.key or not _fits(tensor, spec):
            raise RuntimeError(f"writer expected {spec}, got {key} of {tensor.nbytes} bytes")
        self._write_part(key, tensor, True, True)

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or key != spec.key:
            raise RuntimeError(f"writer expected {spec}, got {key}")
        if first:
            self._part_bytes = 0
        data = memoryview(flat)
        self._out.file.write(data)
        self._out.sent(data.nbytes)
        self._part_bytes += data.nbytes
        if last:
            if self._part_bytes != spec.nbytes:
                raise RuntimeError(f"{key}: {self._part_bytes} bytes written, {spec.nbytes} expected")
            self._next += 1

    def fill(self, values: dict[str, str]) -> None:
        header = _filled(self._header, values)
        self._out.file.flush()
        os.pwrite(self._out.file.fileno(), header, 0)
        self._header = header

    def _close(self) -> None:
        if self._next != len(self._specs):
            raise RuntimeError(f"{self.path}: {len(self._specs) - self._next} tensors not written")
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()


PENDING = "~pending-content~"  # in a placeholder the read pass fills in (engine/content.py)


def without_pending(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` with the placeholders of `average.inputs` left out (each entry's `content`
    not yet known): for the shards of a folder, written before the pass ends (their bytes
    then do not depend on it); the folder's index, written last, holds the values."""
    text = metadata.get("average.inputs", "")
    if PENDING not in text:
        return metadata
    entries = json.loads(text)
    for e in entries:
        if isinstance(e, dict) and PENDING in str(e.get("content", "")):
            del e["content"]
    return {**metadata, "average.inputs": json.dumps(entries)}


def filled_metadata(metadata: dict[str, str],
                    values: dict[str, str | None]) -> dict[str, str]:
    """`metadata` with each placeholder replaced by its value; without the entries' content
    where a value is None (not every hash is known: a resumed run whose earlier shards
    recorded no digests)."""
    if any(v is None for v in values.values()):
        return without_pending(metadata)
    for old, new in values.items():
        metadata = {k: v.replace(old, new) for k, v in metadata.items()}
    return metadata


def _filled(data: bytes, values: dict[str, str]) -> bytes:
    """`data` with each placeholder replaced by its value (the same length: offsets hold).
    A layout that holds no metadata (a Hugging Face `.bin`) holds no placeholder."""
    for old, new in values.items():
        if len(old) != len(new) or data.count(old.encode()) > 1:
            raise RuntimeError(f"placeholder {old!r}: more than once in the output, or "
                               f"{new!r} is not of its length")
        data = data.replace(old.encode(), new.encode())
    return data


def shard_names(n: int) -> list[str]:
    """The Hugging Face names of a folder's `n` shards, in order (one spelling for the
    one-process writer and for torchrun's ranks)."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def rank_shard_names(keys: list[list[str]]) -> list[str]:
    """The shard each torchrun rank writes (its share `keys[rank]`), numbered over the
    ranks that have tensors (a rank with none writes no shard)."""
    names = shard_names(sum(1 for k in keys if k))
    return [names[sum(1 for k in keys[:r] if k)] if keys[r] else "" for r in range(len(keys))]


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


def folder_index(weight_map: dict[str, str], metadata: dict[str, str], total_size: int,
                 side: dict[str, bytes]) -> dict:
    """The index of a sharded folder output (model.safetensors.index.json)."""
    extra = {SIDE_FILES_KEY: json.dumps(sorted(side))} if side else {}
    return {"metadata": {"total_size": total_size, **metadata, **extra}, "weight_map": weight_map}


def commit_folder(tmp: str, path: str, weight_map: dict[str, str], metadata: dict[str, str],
                  total_size: int, side_files: dict[str, bytes] | None = None) -> None:
    """Finish a sharded folder built in `tmp` (its shards written): side files, the index
    last, then swap it in for `path` (which may only hold an earlier output of ours)."""
    side = dict(side_files or {})
    for name, data in side.items():  # config.json, tokenizer files, ...
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    index = folder_index(weight_map, metadata, total_size, side)
    with open(os.path.join(tmp, INDEX_NAME), "w") as f:  # an OSError here is named by close()
        json.dump(index, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o755)
    old = None
    if os.path.isdir(path):
        _ours(path)  # still nothing but an earlier output of ours
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old",
                               dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def partition(specs: list[TensorSpec], ranks: int) -> list[list[str]]:
    """Tensor names per torchrun rank, balanced by bytes: largest first to the least loaded
    rank (ties: the lower rank), each rank's names kept in plan order. Deterministic."""
    load = [0] * ranks
    owner: dict[str, int] = {}
    for s in sorted(specs, key=lambda s: (-s.nbytes, s.key)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[s.key] = r
        load[r] += s.nbytes
    return [[s.key for s in specs if owner[s.key] == r] for r in range(ranks)]


class _RankStaging:
    """What a torchrun rank other than 0 knows of the staging folder rank 0 holds: where it
    is, the shards an earlier run finished and their records. The rank records its own
    shard there; the folder's bookkeeping (settle, keep or drop, release) is rank 0's."""

    def __init__(self, path: str, done: list[str], notes: list[str], content: dict):
        self.path, self.done, self.notes, self.content = path, set(done), notes, content

    def finished(self, name: str, content: dict | None = None) -> None:
        from ckptavg.io.staging import record_done

        record_done(self.path, name, content)

    def settle(self) -> None:
        return None

    def keep_or_drop(self) -> None:
        return None

    def release(self) -> None:
        return None


class ShardedWriter(Writer):
    """A folder of safetensors shards plus model.safetensors.index.json (Hugging Face layout).

    An existing folder is replaced only when it holds nothing but an earlier output of ours
    (checked again just before the swap).

    Under torchrun (`group`, a `parallel.Group`: `rank`, `size`, `agree`, `share`) every rank
    makes the same writer: the tensors are shared out by bytes (`partition`), one shard per
    rank with tensors (`rank_shard_names`), each rank writes and records its own in the
    staging folder rank 0 holds, the ranks exchange their records when the pass is done
    (`recorded`, or at the close), and rank 0 commits the folder; a failure on any rank is
    agreed on, so every rank stops with the same line instead of hanging."""

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 shard_size: int, side_files: dict[str, bytes] | None = None,
                 run: dict | None = None, resume: bool = False, group=None):
        self.path = self._where(path)
        self._side = dict(side_files or {})
        self.group = group
        if group is None:
            self._shards = split_shards(list(specs), shard_size)
            self._names = shard_names(len(self._shards))
            self._mine = set(self._names)
        else:
            by_key = {s.key: s for s in specs}
            keys = partition(list(specs), group.size)
            self._names = rank_shard_names(keys)
            self._shards = [[by_key[k] for k in share] for share in keys]
            self._mine = {self._names[group.rank]} - {""}
        # With `run` (what fixes the shards' bytes: staging.describe), the shards are built
        # in the output's staging folder and each finished one is recorded, so that a
        # failed or killed run can be finished with `resume`; else in a temporary folder.
        self.staging = None
        self.notes = []
        if run is not None:
            shards = {name: [s.key for s in shard]
                      for name, shard in zip(self._names, self._shards) if name}
            self.staging = self._stage({**run, "shards": shards}, resume)
            self._tmp, self.notes = self.staging.path, self.staging.notes
        elif group is not None:  # a temporary folder rank 0 makes beside the output
            self._tmp = group.on_rank0(self._begin)
        else:
            self._tmp = self._begin()
        self._metadata = dict(metadata)
        self._current: SafetensorsWriter | None = None
        self._shard = -1
        self._left = 0
        self._records: dict[str, dict] = {}  # this run's finished shards' records, by name
        self._exchanged: dict[str, dict] | None = None  # every rank's (after `_exchange`)
        self._failure: BaseException | None = None
        self.bytes_written = sum(s.nbytes for s in specs)

    def _stage(self, want: dict, resume: bool):
        """The staging folder: made (or checked, to resume) here, or under torchrun by rank 0,
        the others told where it is and what an earlier run finished there."""
        from ckptavg.io.staging import Staging

        if self.group is None:
            return Staging(self.path, want, resume)
        staging = self.group.on_rank0(lambda: Staging(self.path, want, resume), share=False)
        seen = self.group.share((staging.path, sorted(staging.done), staging.notes,
                                 staging.content) if staging is not None else None)
        return staging if staging is not None else _RankStaging(*seen)

    @staticmethod
    def _where(path: str) -> str:
        return os.path.abspath(path.rstrip(os.sep) or os.sep)

    # the content hashes of the pass (engine/content.ContentHashes), when taken: each
    # finished shard records its tensors' digests, so that a resumed run has them all
    hashes = None

    @property
    def fills_metadata(self) -> bool:  # the index is written last, with the values
        return self.staging is not None or self.group is not None

    def fill(self, values: dict[str, str | None]) -> None:
        """The index's metadata with each placeholder's value (`filled_metadata`)."""
        self._metadata = filled_metadata(self._metadata, values)

    def recorded(self) -> dict[str, dict]:
        """The digests the finished shards recorded (shard -> record): those of an earlier
        run; under torchrun, every rank's too (this rank's shard is finished first)."""
        earlier = dict(self.staging.content) if self.staging is not None else {}
        if self.group is None:
            return earlier
        return {**earlier, **self._exchange()}

    def _exchange(self) -> dict[str, dict]:
        """Under torchrun: finish this rank's shard, then every rank's records, on every rank
        (an agreement: a rank that failed makes every rank stop). Once."""
        if self._exchanged is None:
            error = None
            try:
                self._finish_mine()
            except OSError as e:  # a full disk: the line every rank gives
                error = write_error(self._shown, e)
            except BaseException as e:
                error = e
            self._exchanged = {}  # before the agreement: an abort after it agrees no more
            for records in self.group.agree(error, self._records):
                self._exchanged.update(records)
        return self._exchanged

    def __exit__(self, exc_type, exc, tb) -> None:
        self._failure = exc
        return super().__exit__(exc_type, exc, tb)

    def _begin(self) -> str:
        """Where the shards are built: a temporary folder beside the output."""
        return temp_folder_beside(self.path)

    def _shard_path(self, name: str) -> str:
        return os.path.join(self._tmp, name)

    def _commit(self, weight_map: dict[str, str]) -> None:
        """The side files and the index, then the folder swapped in."""
        if self.staging is not None:
            self.staging.settle()
        commit_folder(self._tmp, self.path, weight_map, self._metadata, self.bytes_written,
                      self._side)

    def _commit_ranks(self, weight_map: dict[str, str]) -> None:
        """Under torchrun: rank 0 commits (`_commit`) while the others wait; a failure stops
        every rank with the same line."""
        def commit() -> None:
            try:
                self._commit(weight_map)
            except OSError as e:  # a full disk: the line every rank gives
                raise write_error(self._shown, e) from None

        self.group.on_rank0(commit, share=False)

    def _discard(self) -> None:
        if self.group is None or self.group.rank == 0:  # under torchrun, rank 0's folder
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def _done(self) -> set[str]:
        """The shards a resumed run found done (none without a staging folder)."""
        return self.staging.done if self.staging is not None else set()

    def pending_keys(self) -> list[str] | None:
        """The keys of this process's shards still to write (None: every key)."""
        done = self._done
        if not done and self.group is None:
            return None
        return [s.key for name, shard in zip(self._names, self._shards)
                if name in self._mine and name not in done for s in shard]

    def _next_shard(self) -> int:
        done = self._done
        i = self._shard + 1
        while i < len(self._shards) and (self._names[i] in done or
                                         self._names[i] not in self._mine):
            i += 1
        return i

    def _finish_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
            name = self._names[self._shard]
            keys = [spec.key for spec in self._shards[self._shard]]
            record = None if self.hashes is None else self.hashes.record(keys)
            if record:
                self._records[name] = record  # what the ranks exchange
            if self.staging is not None:
                self.staging.finished(name, record)

    def _open_next(self) -> None:
        self._finish_current()
        self._shard = self._next_shard()
        shard_meta = {**without_pending(self._metadata), "format": "pt"}
        self._current = SafetensorsWriter(self._shard_path(self._names[self._shard]),
                                          self._shards[self._shard], shard_meta, shown=self.path)
        self._left = len(self._shards[self._shard])

    streams_parts = True

    def _write(self, key: str, tensor: np.ndarray) -> None:
        if self._left == 0:
            self._open_next()
        self._current.write(key, tensor)
        self._left -= 1

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        if first and self._left == 0:
            self._open_next()
        self._current.write_part(key, flat, first, last)
        if last:
            self._left -= 1

    def _finish_mine(self) -> None:
        while self._next_shard() < len(self._shards):  # an empty shard is still written
            self._open_next()
        self._finish_current()

    def _close(self) -> None:
        weight_map = {s.key: name for name, shard in zip(self._names, self._shards)
                      for s in shard}
        if self.group is None:
            self._finish_mine()
            self._commit(weight_map)
        else:
            self._exchange()
            self._commit_ranks(weight_map)
        if self.staging is not None:
            self.staging.release()

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
        if self.group is not None and self._exchanged is None:
            self._exchanged = {}  # this rank failed before the exchange: the others are
            try:  # waiting in it, and stop with this rank's line
                self.group.agree(self._failure or RuntimeError("the writer was aborted"))
            except BaseException:
                pass  # this rank raises its own error
        if self.staging is not None:
            self.kept = self.staging.keep_or_drop()
        else:
            self._discard()


class RemoteShardedWriter(ShardedWriter):
    """A folder of shards in object storage (a key prefix): each shard is streamed as its
    own multipart upload, which the store shows once complete; the side files, then the
    index, are put last, so a reader finds the folder (by its index) only when it is whole.
    A failure removes the shards already made; a killed run leaves complete shards without
    an index, which no reader takes for a checkpoint, and a rerun refuses the prefix until
    they are removed."""

    @staticmethod
    def _where(path: str) -> str:
        return path.rstrip("/")

    def _begin(self) -> str:
        self._made: list[str] = []
        return self.path

    def _shard_path(self, name: str) -> str:
        self._made.append(f"{self.path}/{name}")
        return self._made[-1]

    def _commit(self, weight_map: dict[str, str]) -> None:
        try:
            for name, data in self._side.items():
                remote.put(f"{self.path}/{name}", data)
                self._made.append(f"{self.path}/{name}")
            remote.put(f"{self.path}/{INDEX_NAME}",
                       json.dumps(folder_index(weight_map, self._metadata, self.bytes_written,
                                               self._side), indent=2).encode())
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        remote.remove(self._made)


class TorchWriter(Writer):
    """A torch.save file in its suffix's ecosystem layout, written without torch and
    streamed: each storage record is written as the engine hands its slices over (see
    io/torchzip.py), so memory never holds the model. `torch.load(weights_only=True)` and
    `mmap=True` read it, with torch's default settings.

    - a bare state dict (an OrderedDict, as `torch.save(model.state_dict())` writes it) for
      `.bin` (Hugging Face's `from_pretrained` reads it) and where `entry` is None (the
      newest input was bare, or fastai's {model, opt}), with the metadata as its
      `ckptavg_metadata` attribute (torchzip.BareState), which `load_state_dict` ignores;
    - else (`.pt`, `.pth`, `.ckpt`, `.tar`): `{entry: state dict, "metadata": ..., **extras}`, where
      `entry` is where the newest input kept its weights (`state_dict`, `model`,
      `model_state_dict`...) and `extras` its carried configuration as plain values
      (Lightning's version and hyper-parameters, so `load_from_checkpoint` accepts a `.ckpt`;
      fairseq's cfg/args), whose tensors (`RawTensor`) get records of their own.

    Tied names (`ties`: name -> the name whose storage it shares) are one tensor in the
    pickle and one record; the caller writes only the first name of each tie.
    """

    streams_parts = True
    shares_ties = True

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 ties: dict[str, str] | None = None, entry: str | None = "state_dict",
                 extras: dict | None = None, force_zip64: bool = False):
        self.path = path
        ties = dict(ties or {})  # a tied name -> the first name of its tensor (find_ties)
        own = [s for s in specs if s.key not in ties]
        self._queue = [TensorRecord(str(i), s.dtype, s.shape, s.nbytes)
                       for i, s in enumerate(own)]
        by_key = {s.key: r for s, r in zip(own, self._queue)}
        state = {s.key: by_key[ties.get(s.key, s.key)] for s in specs}
        self._blobs: list[tuple[TensorRecord, bytes]] = []
        extras = {k: v for k, v in (extras or {}).items() if k not in (entry, "metadata")}
        bare = entry is None or path.lower().endswith(".bin")
        obj = BareState(state, dict(metadata)) if bare else {**extras, entry: state,
                                                             "metadata": dict(metadata)}
        self._pickled = Pickle(self._blob).dumps(obj)
        self._next = 0
        self.bytes_written = sum(r.nbytes for r in self._queue)
        self._out = output_file(path, self.bytes_written + len(self._pickled))
        self.fills_metadata = not is_remote(path)
        try:
            self._zip = ZipStream(self._out.file, force_zip64)
            head_records(self._zip, self._pickled)
        except OSError as e:
            self._out.abort()
            raise write_error(path, e) from None

    def _blob(self, value: RawTensor) -> TensorRecord:
        """A record of its own for a tensor among the carried entries (written at close)."""
        rec = TensorRecord(f"x{len(self._blobs)}", value.dtype, value.shape, len(value.data))
        self._blobs.append((rec, value.data))
        return rec

    def _write(self, key: str, tensor: np.ndarray) -> None:
        self._write_part(key, tensor, True, True)

    def _write_part(self, key: str, flat: np.ndarray, first: bool, last: bool) -> None:
        rec = self._queue[self._next] if self._next < len(self._queue) else None
        if rec is None:
            raise RuntimeError(f"writer expected no more tensors, got {key}")
        if first:
            self._zip.begin(f"data/{rec.key}", rec.nbytes)
        self._zip.feed(memoryview(flat))
        if last:
            self._zip.end()
            self._next += 1

    def fill(self, values: dict[str, str]) -> None:
        pickled = _filled(self._pickled, values)
        self._zip.replace("data.pkl", pickled)
        self._pickled = pickled

    def _close(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"{self.path}: {len(self._queue) - self._next} tensors not written")
        for rec, data in self._blobs:
            self._zip.record(f"data/{rec.key}", data)
        tail_records(self._zip, self._pickled)
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()
