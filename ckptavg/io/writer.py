"""Atomic, streaming output that never replaces what is not ours.

Every writer writes into a temporary file (or folder) beside the target and renames it
into place only after everything has been written and fsync'd: an interrupted or failed run
leaves the old output or none, never a partial one, and no temporary file. Writers are
context managers: a clean exit commits, an exception aborts. The safetensors writers take
tensors one at a time in the order announced up front, so memory never holds the model.

Before anything is written, `check_output` refuses an output that is (or, for a folder,
contains) a file of an input, and a folder output that holds anything but an earlier
sharded output of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import queue
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Union

from ckptavg.errors import OptionError, OutputError
from ckptavg.io.base import (
    CODES,
    INDEX_NAME,
    SIDE_FILES,
    TORCH_SUFFIXES,
    SourceFile,
    TensorSpec,
    import_torch,
)
from ckptavg.io.torchzip import (
    Pickle,
    RawTensor,
    TensorRecord,
    ZipStream,
    head_records,
    tail_records,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    Data = Union[torch.Tensor, np.ndarray]  # a tensor, or its raw bytes as numpy holds them

SAFETENSORS_SUFFIX = ".safetensors"


# Non-weight files of a Hugging Face model folder, copied into a folder output so that
# `from_pretrained(output)` works. Only these names, never code or training state.
SIDE_FILES_KEY = "ckptavg.side_files"


def output_kind(path: str, shard_size: int | None = None, dcp: bool = False) -> str:
    """'safetensors', 'sharded', 'torch' or 'dcp' (asked for) from the output path; a path
    that asks for none of them is an OptionError naming the output option."""
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
            raise OptionError(("output", "shard_size"), f"{path}: a shard size asks for a "
                              "folder; give a folder name, not a torch file")
        return "torch"
    if lower.endswith(SAFETENSORS_SUFFIX):
        if shard_size:
            raise OptionError(("output", "shard_size"), f"{path}: a shard size asks for a "
                              "folder of shards; drop the .safetensors suffix")
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


def check_output(path: str, kind: str, inputs: Iterable[SourceFile]) -> None:
    """Refuse an output that would replace an input's file or anything not ours."""
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


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_WRITE_HINTS = {
    errno.ENOSPC: "free space, or pick a folder on another disk",
    errno.EDQUOT: "free space within your quota, or pick another folder",
    errno.EFBIG: "the file would pass a size limit (ulimit -f, or the file system's largest "
                 "file): raise the limit, or write a sharded folder output",
    errno.EACCES: "the folder is not writable by you: pick another folder",
    errno.EPERM: "the folder is not writable by you: pick another folder",
    errno.EROFS: "the file system is read-only: pick a folder on a writable one",
    errno.ENOENT: "the folder is gone: create it, or pick another",
}


def write_error(path: str, e: OSError) -> OutputError:
    """One line for a failed write: what, where, and the fix the errno points to."""
    hint = _WRITE_HINTS.get(e.errno, "pick another folder")
    return OutputError(f"{path}: cannot write the output ({e.strerror or e}); nothing was "
                       f"written: {hint}")


try:  # Linux: start writing dirty pages back now, so the final fsync has little left to wait for
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):
    _sync_file_range = None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to begin writing [offset, offset + nbytes) to disk, without waiting."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def tensor_bytes(t: Data) -> memoryview:
    """The tensor's bytes without a copy (little-endian, C order); a numpy array (the
    averaging engine's output: raw bytes of the spec's dtype) as it is."""
    if _is_numpy(t):
        return memoryview(t).cast("B") if t.size else memoryview(b"")
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(import_torch().uint8).numpy())


def _is_numpy(t: Data) -> bool:
    return type(t).__module__ == "numpy"  # without importing numpy to ask


def _fits(t: Data, spec: TensorSpec) -> bool:
    """A torch tensor has the spec's shape; the engine's numpy output is its raw bytes."""
    return t.nbytes == spec.nbytes if _is_numpy(t) else tuple(t.shape) == spec.shape


# errnos that say the output could not be written (a full disk, a read-only file system, a
# size limit): whatever code wrote into an atomic output (a plot, a CSV, a state dict), one
# line naming the output. Other OSErrors inside the block keep their traceback.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class Atomic:
    """A context manager that commits (`close`) on a clean exit and aborts on an error, also
    when the commit itself fails. A full disk (OUTPUT_ERRNOS) inside the block or in the
    commit becomes one OutputError naming the output."""

    path: str
    shown: str | None = None  # the name errors give, when not `path` (a shard: its folder)

    @property
    def _shown(self) -> str:
        return self.shown or self.path

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            self._raise_output_error(exc)
            return
        try:
            self.close()
        except BaseException as e:
            self.abort()
            self._raise_output_error(e)
            raise

    def _raise_output_error(self, e: BaseException) -> None:
        if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
            raise write_error(self._shown, e) from None


class AtomicFile(Atomic):
    """A temporary file beside `path`, renamed over it on commit, removed on abort."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise OutputError(f"{path}: folder {folder} does not exist; create it first")
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                            dir=folder)
        except OSError as e:
            raise write_error(path, e) from None
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def close(self) -> None:
        self.commit()

    def abort(self) -> None:
        # Unlink first: closing flushes the buffer, which fails again on a full disk.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
        with contextlib.suppress(OSError, ValueError):
            self.file.close()



@contextlib.contextmanager
def atomic_text(path: str) -> Iterator:
    """A text file written beside `path` and renamed over it when the block ends cleanly."""
    import io

    with AtomicFile(path) as out:
        text = io.TextIOWrapper(out.file, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()

class Writer(Atomic):
    """Base of the writers: a context manager that commits on success, aborts on error,
    and turns a failing disk into one OutputError naming the output."""

    keeps_tensors = False  # takes torch tensors whole, and holds them (DCP)
    shares_ties = False  # tied names are one tensor: only the first of each is written
    streams_parts = False  # takes a tensor in consecutive flat slices (write_part)

    def write(self, key: str, tensor: Data) -> None:
        try:
            self._write(key, tensor)
        except OSError as e:
            raise write_error(self._shown, e) from None

    def write_part(self, key: str, flat: Data, first: bool, last: bool) -> None:
        """Write a tensor in consecutive flat slices (writers with `streams_parts`)."""
        try:
            self._write_part(key, flat, first, last)
        except OSError as e:
            raise write_error(self._shown, e) from None

    def _write_part(self, key: str, flat: Data, first: bool, last: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        try:
            self._close()
        except OSError as e:
            raise write_error(self._shown, e) from None

    def _write(self, key: str, tensor: Data) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError



class BackgroundWriter:
    """Runs a writer's `write` on one thread, so that copying a tensor to the file overlaps
    the arithmetic of the next one. The caller takes a free buffer with `buffer()`, fills it
    and hands it over with `write`; the buffer comes back free once written. A write error
    is raised in the caller's thread at the next `buffer()` or at `finish()`."""

    def __init__(self, writer: Writer, buffers: list[Data]):
        self._writer = writer
        self._free: queue.Queue = queue.Queue()
        for b in buffers:
            self._free.put(b)
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="ckptavg-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, tensor, buf, part = job
            try:
                if self._error is None:
                    if part is None:
                        self._writer.write(key, tensor)
                    else:
                        self._writer.write_part(key, tensor, *part)
            except BaseException as e:
                self._error = e
            finally:
                if buf is not None:
                    self._free.put(buf)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> Data:
        self._raise()
        buf = self._free.get()
        self._raise()
        return buf

    def write(self, key: str, tensor: Data, buf: Data | None = None,
              part: tuple[bool, bool] | None = None) -> None:
        """Queue `tensor` (a view of `buf`, or a tensor nobody else changes); with `part`
        (first, last), a flat slice of the tensor (the writer must stream parts)."""
        self._raise()
        self._jobs.put((key, tensor, buf, part))

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
        header = safetensors_header(self._specs, metadata)
        self._out = AtomicFile(path)
        try:
            self._out.file.write(header)
        except OSError as e:
            self._out.abort()
            raise write_error(self._shown, e) from None
        self.bytes_written = sum(s.nbytes for s in self._specs)

    streams_parts = True

    def _write(self, key: str, tensor: Data) -> None:
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or key != spec.key or not _fits(tensor, spec):
            raise RuntimeError(f"writer expected {spec}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        self._write_part(key, tensor, True, True)

    def _write_part(self, key: str, flat: Data, first: bool, last: bool) -> None:
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        if spec is None or key != spec.key or (not _is_numpy(flat) and flat.dtype != spec.dtype):
            raise RuntimeError(f"writer expected {spec}, got {key} {flat.dtype}")
        if first:
            self._part_bytes = 0
        data = tensor_bytes(flat)
        self._out.file.write(data)
        self._out.file.flush()
        fd = self._out.file.fileno()
        end = os.lseek(fd, 0, os.SEEK_CUR)
        start_writeback(fd, end - data.nbytes, data.nbytes)
        self._part_bytes += data.nbytes
        if last:
            if self._part_bytes != spec.nbytes:
                raise RuntimeError(f"{key}: {self._part_bytes} bytes written, {spec.nbytes} expected")
            self._next += 1

    def _close(self) -> None:
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
    extra = {SIDE_FILES_KEY: json.dumps(sorted(side))} if side else {}
    index = {"metadata": {"total_size": total_size, **metadata, **extra}, "weight_map": weight_map}
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
    _fsync_dir(os.path.dirname(path))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def temp_folder_beside(path: str) -> str:
    """A hidden temporary folder in `path`'s parent, for a folder output built atomically."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: folder {parent} does not exist; create it first")
    try:
        return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise write_error(path, e) from None


class ShardedWriter(Writer):
    """A folder of safetensors shards plus model.safetensors.index.json (Hugging Face layout).

    An existing folder is replaced only when it holds nothing but an earlier output of ours
    (checked again just before the swap)."""

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 shard_size: int, side_files: dict[str, bytes] | None = None):
        self.path = os.path.abspath(path.rstrip(os.sep) or os.sep)
        self._side = dict(side_files or {})
        self._tmp = temp_folder_beside(self.path)
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
                                          self._shards[self._shard], shard_meta, shown=self.path)
        self._left = len(self._shards[self._shard])

    streams_parts = True

    def _write(self, key: str, tensor: Data) -> None:
        if self._left == 0:
            self._open_next()
        self._current.write(key, tensor)
        self._left -= 1

    def _write_part(self, key: str, flat: Data, first: bool, last: bool) -> None:
        if first and self._left == 0:
            self._open_next()
        self._current.write_part(key, flat, first, last)
        if last:
            self._left -= 1

    def _close(self) -> None:
        while self._shard + 1 < len(self._shards):  # empty model: still write the shard
            self._open_next()
        if self._current is not None:
            self._current.close()
        weight_map = {s.key: self._names[i] for i, shard in enumerate(self._shards) for s in shard}
        commit_folder(self._tmp, self.path, weight_map, self._metadata, self.bytes_written,
                      self._side)

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)


class TorchWriter(Writer):
    """A torch.save file in its suffix's ecosystem layout, written without torch and
    streamed: each storage record is written as the engine hands its slices over (see
    io/torchzip.py), so memory never holds the model. `torch.load(weights_only=True)` and
    `mmap=True` read it, with torch's default settings.

    - `.bin`: a plain state dict, as Hugging Face's `from_pretrained` reads it (no place for
      metadata: it is dropped; write .safetensors to keep it).
    - `.pt`, `.pth`, `.ckpt`, `.tar`: `{entry: state dict, "metadata": ..., **extras}`, where
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
                 ties: dict[str, str] | None = None, entry: str = "state_dict",
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
        obj = state if path.lower().endswith(".bin") else {**extras, entry: state,
                                                           "metadata": dict(metadata)}
        self._pickled = Pickle(self._blob).dumps(obj)
        self._next = 0
        self.bytes_written = sum(r.nbytes for r in self._queue)
        self._out = AtomicFile(path)
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

    def _write(self, key: str, tensor: Data) -> None:
        self._write_part(key, tensor, True, True)

    def _write_part(self, key: str, flat: Data, first: bool, last: bool) -> None:
        rec = self._queue[self._next] if self._next < len(self._queue) else None
        if rec is None or (not _is_numpy(flat) and flat.dtype != rec.dtype):
            raise RuntimeError(f"writer expected {rec}, got {key} {flat.dtype}")
        if first:
            self._zip.begin(f"data/{rec.key}", rec.nbytes)
        self._zip.feed(tensor_bytes(flat))
        if last:
            self._zip.end()
            self._next += 1

    def _close(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"{self.path}: {len(self._queue) - self._next} tensors not written")
        for rec, data in self._blobs:
            self._zip.record(f"data/{rec.key}", data)
        tail_records(self._zip, self._pickled)
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()


class DcpWriter(Writer):
    """A torch.distributed.checkpoint folder (what `dcp.load` and FSDP read), with ckptavg's
    metadata beside it in ckptavg.json. DCP saves a whole state dict at once, so this writer
    holds the model until close (under torchrun each rank holds only its share: see
    distributed.write_shards)."""

    keeps_tensors = True
    shares_ties = True

    def __init__(self, path: str, specs: list[TensorSpec], metadata: dict[str, str],
                 ties: dict[str, str] | None, entry: str | None):
        self.path = os.path.abspath(path.rstrip(os.sep) or os.sep)
        self._tmp = temp_folder_beside(self.path)
        self._order = [s.key for s in specs]
        self._meta, self._ties, self._entry = dict(metadata), dict(ties or {}), entry
        self._tensors: dict[str, torch.Tensor] = {}

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        self._tensors[key] = tensor

    def _close(self) -> None:
        from ckptavg.io.dcp import commit_dcp, save_dcp

        for k, v in self._ties.items():
            self._tensors[k] = self._tensors[v]
        save_dcp({k: self._tensors[k] for k in self._order}, self._tmp, self._entry,
                 self._meta, distributed=False)
        commit_dcp(self._tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def make_writer(path: str, specs: list[TensorSpec], metadata: dict[str, str],
                shard_size: int | None = None, ties: dict[str, str] | None = None,
                inputs: Iterable[SourceFile] = (), entry: str = "state_dict",
                extras: dict | None = None, side_files: dict[str, bytes] | None = None,
                dcp: bool = False) -> Writer:
    """The writer that the output path's suffix asks for, after `check_output`.

    `entry` and `extras` shape a torch output (see TorchWriter); `side_files` (name ->
    bytes, names from SIDE_FILES) go into a folder output. Use it as a context
    manager: `with make_writer(...) as w: w.write(key, t)` commits on a clean exit and
    leaves nothing behind on an error."""
    kind = output_kind(path, shard_size, dcp)
    check_output(path, kind, inputs)
    if kind == "dcp":
        return DcpWriter(path, specs, metadata, ties, entry if entry in ("state_dict", "model")
                         else None)
    if kind == "torch":
        return TorchWriter(path, specs, metadata, ties, entry, extras)
    if kind == "sharded":
        return ShardedWriter(path, specs, metadata, shard_size or 5 * 10**9, side_files)
    return SafetensorsWriter(path, specs, metadata)


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[SourceFile]:
    """Hold an exclusive lock on the file (or folder) at `path` for a read-fold-replace.

    The lock is on the inode. A writer that replaces the path by rename leaves waiters
    holding the old inode, so after locking, the path is checked to still be that inode;
    if not, the newer file is locked instead. Yields the locked file's identity."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OutputError(f"{path}: cannot open to lock it ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                yield SourceFile.of(path, st)
                return
        finally:
            os.close(fd)  # closing the descriptor releases the lock
