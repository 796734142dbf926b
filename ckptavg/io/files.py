"""Files as byte sources: opened once (`open_source`: a regular file, or refused), read with
pread through that descriptor (`OpenFile`, `pread_extent` over an `Extent`, checked as it is
read where a check is attached), mapped pages handed back (`drop_pages`), and what
identifies a file (`SourceFile.stamp`, the sampled `fingerprint`, `same_content`,
`stamp_change`, `check_unchanged`). An object in a store (io/remote.py's RemoteFile)
answers the same calls."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import stat
import struct
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ckptavg.errors import CheckpointError
from ckptavg.io.dtypes import (
    DType,
)

if TYPE_CHECKING:
    pass


@runtime_checkable
class ByteSource(Protocol):
    """What a checkpoint's bytes are read from, by offset: an open local file (`OpenFile`)
    or an object in a store (`remote.RemoteFile`). Every format reads through this one
    protocol; `remote` tells a format only how it may read (map the file, or read spans
    with a few requests), and the engine never asks."""

    path: str
    size: int
    remote: bool

    def get(self, offset: int, n: int) -> bytes: ...
    def get_many(self, spans: list[tuple[int, int]]) -> list[bytes]: ...
    def pread(self, view: memoryview, offset: int) -> None: ...
    def open(self): ...
    def extent(self, offset: int, check: object = None) -> Extent: ...
    def number(self, offset: int, dtype: DType) -> float | None: ...
    def close(self) -> None: ...


@runtime_checkable
class SourceIdentity(Protocol):
    """What identifies a file an input consists of, as it was opened (a local file's
    `SourceFile`, an object's `remote.RemoteFile`): its identity and stamp (recorded in
    `average.inputs`, compared by `--into`, `--resume` and `verify`), a reader of its bytes
    as opened (fingerprints, copies, hashes), and whether it changed since."""

    path: str
    size: int

    @property
    def identity(self) -> tuple: ...
    def stamp(self) -> dict[str, object]: ...
    def changed(self) -> bool: ...
    def reader(self): ...


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
