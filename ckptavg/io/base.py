"""What every checkpoint format shares: tensor specs, the reader base, files and pages.

Formats import this module and never each other; `ckptavg.io.open_checkpoint` picks a
format by content. Every file is untrusted: it is opened once (`open_source`), refused
unless it is a regular file, and read through that one descriptor.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError
from ckptavg.io.dtypes import (  # noqa: F401 (the formats import them from here)
    CODES,
    DTYPES,
    DType,
    dtype_of,
    import_torch,
)

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
# Where training checkpoints keep the model's weights, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
BIN_INDEX_NAME = "pytorch_model.bin.index.json"  # Hugging Face's sharded torch layout
BIN_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's plan, beside its *.distcp files


def is_dcp_folder(path) -> bool:
    """A torch.distributed.checkpoint folder (told by its files: no torch needed); `path`
    is a folder's path or a Folder."""
    folder = path if isinstance(path, Folder) else Folder(path)
    return folder.has(DCP_METADATA) and any(n.endswith(".distcp") for n in folder.names())

# Wrapper prefixes added by DataParallel/DDP (module.) and torch.compile (_orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and dtype: what a reader knows before reading it, and what a
    writer is told to expect."""

    key: str
    shape: tuple[int, ...]
    dtype: DType  # a torch dtype given here is taken as its DType

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, DType):
            object.__setattr__(self, "dtype", dtype_of(self.dtype))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class SourceFile:
    """One file an input consists of, as it was when opened: what identifies it (as git's
    index and rsync do) is its device, inode, size, mtime and ctime (`stamp`)."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0

    @property
    def identity(self) -> tuple:
        return (self.dev, self.ino)

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> SourceFile:
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def stamp(self) -> dict[str, object]:
        """What identifies the file as opened, for a record (average.inputs, a resume plan):
        a later file with the same stamp is taken to be the same file, unread."""
        return {"dev": self.dev, "ino": self.ino, "size": self.size,
                "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}

    @contextlib.contextmanager
    def reader(self):
        """`read(n, offset) -> bytes` over the file as it was opened (refusing a file
        replaced since): what fingerprints, copy checks and hashes read through. An object
        in remote storage (io/remote.py) reads with ranged GETs instead."""
        fd = _reopen(self)
        try:
            yield lambda n, offset: pread_exact(fd, n, offset, self.path)
        finally:
            os.close(fd)

    def changed(self) -> bool:
        """Whether the file was rewritten in place since it was opened (same inode, another
        size or mtime). A file replaced by rename is not: its old bytes were what was read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # removed or renamed away: what was mapped stays intact
        return (st.st_dev, st.st_ino) == self.identity and \
            (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_source(path: str) -> tuple[int, SourceFile]:
    """Open a file for reading, once: (descriptor, what it is). Refuses anything that is not
    a regular file before reading from it (O_NONBLOCK: opening a FIFO does not hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; check the path or glob") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is {file_kind(st.st_mode)}; pass a checkpoint file")
    os.set_blocking(fd, True)
    return fd, SourceFile.of(path, st)


def fd_path(fd: int, path: str) -> str:
    """A name for the open file itself (Linux's /proc/self/fd/N reopens that inode even if
    the path has since been replaced), else the path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


def pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated file (wanted {n} bytes at {offset}); "
                              "the file is incomplete: re-save it")
    return data


def pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` with the file's bytes from `offset` (reads until done; a file that ends
    first was truncated while it was read)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{path}: ended at byte {offset + done} while it was being "
                                  "read (truncated during the run?). Run "
                                  "again once the file is complete")
        done += got


_NUMBER_FORMATS = {"int64": "<q", "int32": "<i", "int16": "<h", "int8": "<b", "uint8": "<B",
                   "float64": "<d", "float32": "<f"}


def number_at(file, offset: int, dtype: DType, big: bool = False) -> float | None:
    """The value of a one-element tensor of `dtype` stored at `offset` of an open file
    (OpenFile, remote.RemoteFile: AveragedModel's n_averaged), little-endian unless `big`;
    None for a dtype this does not decode."""
    fmt = _NUMBER_FORMATS.get(dtype.name)
    if fmt is None:
        return None
    return struct.unpack((">" if big else "<") + fmt[1:], file.get(offset, dtype.itemsize))[0]


class OpenFile:
    """An open local file, read by offset: what the formats read a file through. An object
    in remote storage (remote.RemoteFile) answers the same calls with ranged GETs, so a
    format reads either without knowing which it has."""

    remote = False

    def __init__(self, fd: int, src: SourceFile):
        self.fd, self.path, self.size = fd, src.path, src.size

    @classmethod
    def of(cls, path: str) -> tuple[OpenFile, SourceFile]:
        """Open `path` (`open_source`): (the open file, what it is)."""
        fd, src = open_source(path)
        return cls(fd, src), src

    def get(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n); a file that ends first is one line."""
        return pread_exact(self.fd, n, offset, self.path)

    def get_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """`get` of each (offset, n), in order (remote storage: several at once)."""
        return [self.get(offset, n) for offset, n in spans]

    def pread(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`."""
        pread_into(self.fd, view, offset, self.path)

    def open(self):
        """A file object of this open file (for zipfile), closed by the caller."""
        return open(fd_path(self.fd, self.path), "rb")

    def extent(self, offset: int, check: object = None) -> Extent:
        """Where a tensor's bytes lie, for the engine's reads (`pread_extent`)."""
        return Extent(self.fd, offset, self.path, check)

    def number(self, offset: int, dtype: DType) -> float | None:
        """The value of a one-element tensor stored at `offset` (`number_at`)."""
        return number_at(self, offset, dtype)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


@dataclass(frozen=True)
class Extent:
    """Where a tensor's raw little-endian bytes lie in an open file: read them with pread
    instead of touching mapped pages (no page faults, no file pages in RSS, and a file
    truncated meanwhile is an error rather than SIGBUS)."""

    fd: int
    offset: int
    path: str
    check: object = None  # a crc.RecordCheck of the zip record these bytes lie in: feed it
    source: object = None  # an object in remote storage (remote.RemoteFile): read from it


CHECK_PIECE = 256 << 10  # checked bytes are summed while still in the core's cache


def pread_extent(ext: Extent, view: memoryview, start: int = 0) -> None:
    """Fill `view` with the extent's bytes from `start` on, and feed them to its check,
    piece by piece: each piece is summed right after it is read, from the cache."""
    if ext.source is not None:
        if ext.check is not None:
            ext.check.confirm(ext.source, ahead=True)
        ext.source.pread(view, ext.offset + start)
        if ext.check is not None:
            ext.check.update(ext.offset + start, view)
        return
    if ext.check is None:
        pread_into(ext.fd, view, ext.offset + start, ext.path)
        return
    for lo in range(0, len(view), CHECK_PIECE):
        piece = view[lo:lo + CHECK_PIECE]
        pread_into(ext.fd, piece, ext.offset + start + lo, ext.path)
        ext.check.update(ext.offset + start + lo, piece)


def keep_descriptor(fd: int) -> bool:
    """Whether a reader may keep `fd` open for reads: while the process uses under half its
    descriptor limit (descriptors are numbered lowest first), so many inputs of many shards
    cannot exhaust it; past that, files are read through their mapping only."""
    if resource is None:
        return True
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft == resource.RLIM_INFINITY or fd < soft // 2


def check_unchanged(files: list[SourceFile]) -> None:
    """Refuse a result read from a file that was rewritten in place while it was read.

    A file replaced by rename is harmless: its old contents stay mapped and are what was
    read. The same inode with another size or mtime means its bytes changed under us."""
    for f in files:
        if f.changed():
            raise CheckpointError(
                f"{f.path}: was modified while it was being read, so the result would mix two "
                "versions of it. Run again once the file is complete "
                "(writers should save to a temporary name and rename)"
            )


# ------------------------------------------------------------------ mapped pages

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # not Linux/glibc: pages are released at close instead
    _madvise = None


def drop_pages(address: int, nbytes: int) -> None:
    """Hand back the pages of a private, never-written file mapping: a later touch faults
    them in again from the page cache, so nothing is lost and RSS stays bounded."""
    if _madvise is None or nbytes <= 0:
        return
    lo = address - address % _PAGE
    hi = address + nbytes
    hi += (-hi) % _PAGE
    _madvise(lo, hi - lo, _MADV_DONTNEED)


# ------------------------------------------------------------------ keys, ties, metadata


def strip_keys(raw: list[str], strip_prefix: str | None, path: str) -> tuple[dict[str, str], list[str]]:
    """(public name -> raw name, prefixes removed). Wrapper prefixes go when every key
    carries them; `strip_prefix` goes where present, and wrappers under it go too."""
    names = list(raw)
    removed: list[str] = []

    def unwrap() -> None:
        changed = True
        while changed and names:
            changed = False
            for p in WRAPPER_PREFIXES:
                if all(n.startswith(p) for n in names):
                    names[:] = [n[len(p):] for n in names]
                    removed.append(p)
                    changed = True

    unwrap()
    if strip_prefix and strip_prefix in removed and not any(
            n.startswith(strip_prefix) for n in names):
        strip_prefix = None  # a wrapper prefix (DDP's module.) already stripped: asked for twice
    if strip_prefix:
        if not any(n.startswith(strip_prefix) for n in names):
            raise CheckpointError(
                f"{path}: no key starts with the prefix {strip_prefix!r} to strip "
                f"(first keys: {', '.join(names[:3])}); check the prefix"
            )
        names[:] = [n[len(strip_prefix):] if n.startswith(strip_prefix) else n for n in names]
        removed.append(strip_prefix)
        unwrap()
    mapping: dict[str, str] = {}
    for public, original in zip(names, raw):
        if public in mapping:
            raise CheckpointError(
                f"{path}: keys {mapping[public]!r} and {original!r} both become {public!r} "
                "after stripping prefixes; strip a longer prefix"
            )
        mapping[public] = original
    return mapping, removed


AVERAGED_COUNT = "n_averaged"


def is_averaged_model(raw: list[str]) -> bool:
    """`torch.optim.swa_utils.AveragedModel(...).state_dict()`: `module.*` plus `n_averaged`,
    the number of models averaged (a count, not a weight)."""
    return AVERAGED_COUNT in raw and len(raw) > 1 and all(
        k.startswith("module.") for k in raw if k != AVERAGED_COUNT)


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """Equal for two names of one tensor (same storage, offset, shape, strides, dtype);
    None for empty tensors, which share nothing. A tensor a file describes (pt.TensorRef)
    gives its own."""
    if hasattr(t, "identity"):
        return t.identity()
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


def meta_int(meta: dict[str, str], key: str, minimum: int | None = None) -> int | None:
    """The integer a metadata entry holds (signed decimal digits), else None; with
    `minimum`, a smaller value counts as absent (a count of images cannot be negative).

    Example:
        >>> meta_int({"train.epoch": "12"}, "train.epoch"), meta_int({"x": "-3"}, "x", minimum=0)
        (12, None)
    """
    v = meta.get(key)
    n = ascii_int(v) if isinstance(v, str) else None
    return None if n is None or (minimum is not None and n < minimum) else n


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,4000}")


def ascii_int(text: str) -> int | None:
    """The integer `text` spells in ASCII decimal digits (an optional sign, surrounding blanks
    allowed), exactly, however large; None for anything else (`²`, `٣`, `1e3`, `1_000`)."""
    text = text.strip()
    return int(text) if _ASCII_INT.fullmatch(text) else None


def clean_metadata(meta: object, notes: list[str] | None = None) -> dict[str, str]:
    """Keep a metadata map only if it is a dict; str keys, values JSON-encoded unless str.
    A value past the budget of an untrusted entry (io/pickles.within_budget: what it expands
    to, its depth, a cycle) is left out, with a note naming it in `notes`."""
    from ckptavg.io.pickles import within_budget

    if not isinstance(meta, dict):
        return {}
    out = {}
    for k, v in meta.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, str):
            out[k] = v
            continue
        over = within_budget(v)
        if over is None:
            try:
                out[k] = json.dumps(v, default=str)
                continue
            except (ValueError, RecursionError, TypeError) as e:
                over = f"cannot be written as JSON ({e})"
        if notes is not None:
            notes.append(f"metadata entry {k!r} {over}: left out")
    return out


@dataclass(frozen=True)
class Position:
    """Where in training a checkpoint was saved, and where each number was read."""

    epoch: int | None = None
    step: int | None = None
    epoch_from: str = ""
    step_from: str = ""
    tokens: int | None = None  # tokens consumed in training when the checkpoint was saved
    tokens_from: str = ""

    def merged(self, later: Position) -> Position:
        """Fill what this one lacks from `later` (a less trusted source)."""
        e, ef = (self.epoch, self.epoch_from) if self.epoch is not None else (later.epoch, later.epoch_from)
        s, sf = (self.step, self.step_from) if self.step is not None else (later.step, later.step_from)
        t, tf = (self.tokens, self.tokens_from) if self.tokens is not None \
            else (later.tokens, later.tokens_from)
        return Position(e, s, ef, sf, t, tf)


def whole_number(value: object) -> int | None:
    """An int from an int (not a bool) or an integral float; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
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


FINGERPRINT_BLOCK = 1 << 16


_STAMP_WORDS = {"dev": "device", "ino": "inode", "size": "size", "mtime_ns": "modification time",
                "ctime_ns": "change time (ctime)", "etag": "ETag", "mtime": "modification time"}


def stamp_change(old: object, new: list[dict]) -> str | None:
    """What differs between a recorded identity (`stamp` of each file) and `new`, in words
    (None: the same); a record that is not a list of stamps differs."""
    if not isinstance(old, list) or len(old) != len(new):
        return "its files" if isinstance(old, list) else "its identity was not recorded"
    for a, b in zip(old, new):
        if not isinstance(a, dict):
            return "its identity record is damaged"
        diff = [_STAMP_WORDS.get(k, k) for k in b if a.get(k) != b[k]]
        if diff:
            return ", ".join(diff)
    return None


def fingerprint(files: list[SourceFile]) -> str:
    """A cheap content identity: sha256 over each file's size and four 64 KiB blocks (start,
    thirds, end); the whole file when it is smaller. Equal fingerprints mean very likely the
    same content (copies included); `same_content` confirms."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.size.to_bytes(8, "little"))
        with f.reader() as read:
            if f.size <= 4 * FINGERPRINT_BLOCK:
                h.update(read(f.size, 0))
            else:
                for off in (0, f.size // 3, 2 * f.size // 3, f.size - FINGERPRINT_BLOCK):
                    h.update(read(FINGERPRINT_BLOCK, off))
    return h.hexdigest()[:32]


def same_content(a: list[SourceFile], b: list[SourceFile]) -> bool:
    """Byte-for-byte equality of two inputs (read in 1 MiB blocks, stopping at the first
    difference)."""
    if [f.size for f in a] != [f.size for f in b]:
        return False
    for fa, fb in zip(a, b):
        with fa.reader() as ra, fb.reader() as rb:
            for off in range(0, fa.size, 1 << 20):
                n = min(1 << 20, fa.size - off)
                if ra(n, off) != rb(n, off):
                    return False
    return True


def _reopen(f: SourceFile) -> int:
    fd, now = open_source(f.path)
    if now.identity != f.identity:
        os.close(fd)
        raise CheckpointError(f"{f.path}: was replaced during the run; run again")
    return fd


class ReaderBase(abc.ABC):
    """What every format offers. Keys are the public, prefix-stripped names.

    A reader lists tensor names, describes each one without reading it, and reads one
    tensor at a time (possibly a view of a mapped file, valid until `release(key)` or
    `close()`). `files` are the files it consists of, as they were when opened.
    """

    path: str
    format: str
    location: str = "<top level>"  # where in the file the weights were found
    others: tuple[str, ...] = ()  # other tensor dicts the file holds (torch files)
    removed_prefixes: tuple[str, ...] = ()
    other_entries: tuple[str, ...] = ()  # a torch file's entries besides weights and metadata
    averaged_count: int | None = None  # an AveragedModel's n_averaged, left out of the tensors
    extras_notes: tuple[str, ...] = ()  # what carrying `extras` converted or left out
    read_notes: tuple[str, ...] = ()  # entries left out as they were read (past the budget)
    files: list[SourceFile]
    # The folder the checkpoint is, or lies in, where a reader knows it (remote inputs): its
    # side files (trainer_state.json, config.json) are read from there.
    folder: Folder | None = None
    _names: dict[str, str]
    _fingerprint: str | None = None

    def keys(self) -> list[str]:
        return list(self._names)

    def stored_name(self, key: str) -> str:
        """The name `key` is stored under in the file (before prefixes were stripped)."""
        return self._raw(key)

    def _raw(self, key: str) -> str:
        try:
            return self._names[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    @abc.abstractmethod
    def info(self, key: str) -> TensorSpec:
        """The tensor's name, shape and dtype, from the file's header: nothing is read."""

    @abc.abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """The tensor (possibly a view of a mapped file, valid until `release(key)`)."""

    def locate(self, key: str) -> Extent | None:
        """Where `key`'s bytes lie in an open file, when they are stored raw and
        contiguous (safetensors); None: read it with `read`."""
        return None

    def release(self, key: str) -> None:
        """Hint that the caller is done with `key`: mapped pages may be dropped."""
        return None

    def release_range(self, key: str, start: int, nbytes: int) -> None:
        """Hint that bytes [start, start + nbytes) of `key` are done with (mapped pages).
        `start` may be negative: the kernel maps pages around a faulting one ("fault-around",
        64 KiB), so reading a tensor maps back some pages just before it, which the caller
        releases by reaching back."""
        return None

    def metadata(self) -> dict[str, str]:
        return {}

    def position(self) -> Position:
        """Epoch and step recorded by the training library in the checkpoint itself (not
        ckptavg's metadata, not the name): a Hugging Face trainer_state.json beside it."""
        folder = self.folder
        if folder is None:
            path = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
            folder = Folder(path or ".")
        return trainer_state_position(folder)

    def stamp(self) -> list[dict]:
        """The identity of each file the input consists of, as opened (SourceFile.stamp)."""
        return [f.stamp() for f in self.files]

    def entry(self) -> dict:
        """What a record (average.inputs, a resume plan) keeps of this input: its name, its
        sampled fingerprint and the identity of each of its files."""
        return {"file": os.path.basename(self.path.rstrip(os.sep)),
                "fingerprint": self.fingerprint(), "identity": self.stamp()}

    def fingerprint(self) -> str:
        """`fingerprint(self.files)`, computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.files)
        return self._fingerprint

    def scalars(self) -> dict[str, float]:
        """Numbers a training library stored beside the weights (timm's `metric`); torch files."""
        return {}

    def extras(self) -> dict[str, object]:
        """Non-tensor entries worth carrying into a torch output of the same ecosystem
        (Lightning hyper-parameters and version, fairseq cfg/args); never optimizer state."""
        return {}

    def ties(self) -> dict[str, str]:
        """Aliases: key -> the earlier key whose storage it shares."""
        return {}

    def check_unchanged(self) -> None:
        """Refuse a result read from files that were damaged or changed: finish the checks
        of what was read (`verify`), then compare each file with how it was opened."""
        self.verify()
        check_unchanged(self.files)

    def verify(self) -> None:
        """Finish checking what was read (a torch zip's CRC-32s); raises on a mismatch."""
        return None

    def close(self) -> None:
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
