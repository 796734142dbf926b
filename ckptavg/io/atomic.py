"""Outputs that appear complete or not at all: a temporary file or folder beside the
destination, fsync, rename; one OutputError naming the fix when the disk refuses; the
exclusive lock of a running average. Every writer (writer.py, dcp.py) builds on these."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator

from ckptavg.errors import OutputError
from ckptavg.io.files import SourceFile


def fsync_dir(folder: str) -> None:
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
}


def write_error(path: str, e: OSError) -> OutputError:
    """One line for a failed write: what, where, and the fix the errno points to."""
    hint = _WRITE_HINTS.get(e.errno, "pick another folder")
    if e.errno == errno.ENOENT:  # no folder, or one that takes no new files (/proc, /sys)
        folder = os.path.dirname(os.path.abspath(path))
        hint = ("the folder takes no new files (a special file system such as /proc?): pick "
                "another folder" if os.path.isdir(folder) else
                f"the folder {folder} does not exist: create it, or pick another")
    return OutputError(f"{path}: cannot write the output ({e.strerror or e}); nothing was "
                       f"written: {hint}")


_SYNC_FILE_RANGE_WRITE = 2


try:  # Linux: start writing dirty pages back now, so the final fsync has little left to wait for
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):
    _sync_file_range = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to begin writing [offset, offset + nbytes) to disk, without waiting."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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

    def sent(self, nbytes: int) -> None:
        """The last `nbytes` written are final: start writing them back to disk now."""
        self.file.flush()
        fd = self.file.fileno()
        start_writeback(fd, os.lseek(fd, 0, os.SEEK_CUR) - nbytes, nbytes)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(self.path))

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


def temp_folder_beside(path: str) -> str:
    """A hidden temporary folder in `path`'s parent, for a folder output built atomically."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: folder {parent} does not exist; create it first")
    try:
        return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise write_error(path, e) from None


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
