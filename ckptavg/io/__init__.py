"""Checkpoint formats behind one small interface.

`open_checkpoint(path)` opens the file once, tells its format by content and hands the open
descriptor to that format's reader (base.py holds what the formats share).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from types import SimpleNamespace

from ckptavg.errors import CheckpointError
from ckptavg.io.base import (
    BIN_INDEX_NAME,
    BIN_NAME,
    INDEX_NAME,
    TORCH_SUFFIXES,
    ReaderBase,
    SourceFile,
    TensorSpec,
    import_torch,
    is_dcp_folder,
    open_source,
)
from ckptavg.io.remote import is_remote, open_remote
from ckptavg.io.safetensors import MAX_HEADER, SafetensorsReader
from ckptavg.io.writer import make_writer

Reader = ReaderBase

__all__ = ["Reader", "SourceFile", "TensorSpec", "make_writer", "open_checkpoint", "sniff"]


def sniff_bytes(head: bytes) -> str | None:
    """'safetensors', 'torch-zip' or 'torch-legacy' from a file's first 16 bytes."""
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= MAX_HEADER:
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"  # a bare pickle: torch's pre-1.6 format
    return None


def _folder_kind(path: str) -> str:
    if os.path.exists(os.path.join(path, INDEX_NAME)):
        return "safetensors-sharded"
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return "safetensors-folder"
    if os.path.exists(os.path.join(path, BIN_INDEX_NAME)):
        return "torch-sharded"
    if os.path.exists(os.path.join(path, BIN_NAME)):
        return "torch-folder"
    if is_dcp_folder(path):
        return "dcp"
    found = sorted(os.listdir(path))
    suffixes = Counter(os.path.splitext(n)[1] for n in found
                       if n.lower().endswith((".safetensors", *TORCH_SUFFIXES)))
    pattern = os.path.join(path, "*" + (suffixes.most_common(1)[0][0] if suffixes
                                        else ".safetensors"))
    raise CheckpointError(
        f"{path}: folder has no {INDEX_NAME}, model.safetensors, {BIN_INDEX_NAME}, "
        f"{BIN_NAME} or DCP .metadata (it holds: {', '.join(found[:5]) or 'nothing'}"
        f"{', ...' if len(found) > 5 else ''}); to average the files in it, pass them: "
        f"'{pattern}'"
    )


def _classify(path: str) -> tuple[str, int | None, SourceFile | None]:
    """(format, open descriptor, file) of `path`; a folder has no descriptor. Anything that
    is not a regular file or a folder is refused by `open_source` before it is read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; check the path or glob") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        return _folder_kind(path), None, None
    name = os.path.basename(path)
    if name.endswith(".distcp") or name == ".metadata":
        folder = os.path.dirname(path) or "."
        raise CheckpointError(
            f"{path}: one file of a torch.distributed.checkpoint (DCP) folder, which is read "
            f"whole: pass the folder, {folder.rstrip(os.sep)}{os.sep}")
    fd, src = open_source(path)
    try:
        kind = sniff_bytes(os.pread(fd, 16, 0))
    except BaseException:
        os.close(fd)
        raise
    if kind is None:
        os.close(fd)
        raise CheckpointError(
            f"{path}: not a checkpoint ckptavg can read (expected safetensors or a torch.save "
            f"file such as {', '.join(TORCH_SUFFIXES[:4])}); check the file"
        )
    return kind, fd, src


def sniff(path: str) -> str:
    """The format of `path` by content: 'safetensors', 'torch-zip', 'torch-legacy' for a
    file; 'safetensors-sharded', 'safetensors-folder', 'torch-sharded', 'torch-folder' or
    'dcp' for a folder. Raises CheckpointError for anything else (naming the fix)."""
    kind, fd, _ = _classify(path)
    if fd is not None:
        os.close(fd)
    return kind


def open_checkpoint(path: str | os.PathLike, key: str | None = None,
                    strip_prefix: str | None = None) -> ReaderBase:
    """Open a checkpoint for streaming reads.

    Args:
        path: a safetensors file, a sharded safetensors folder, or a torch.save file.
        key: for torch files, the entry that holds the state dict (e.g. "state_dict_ema").
        strip_prefix: a key prefix to remove (e.g. Lightning's "model.").

    Returns:
        A reader (`keys()`, `info(key)`, `read(key)`, `metadata()`); close it when done or
        use it as a context manager.

    Example:
        >>> with ckptavg.open_checkpoint("runs/a/epoch-0001.safetensors") as r:
        ...     r.format, r.info("fc.weight").shape, r.metadata()["train.epoch"]
        ('safetensors', (10, 128), '1')
    """
    path = os.fspath(path)
    if is_remote(path):
        return open_remote(path, key=key, strip_prefix=strip_prefix)
    kind, fd, src = _classify(path)
    if kind == "dcp":
        return _torch_formats().DCPReader(path, key=key, strip_prefix=strip_prefix)
    if kind in ("torch-folder", "torch-sharded"):
        if key is not None:
            raise CheckpointError(f"{path}: a Hugging Face folder holds plain state dicts, with "
                                  f"no entry {key!r} to pick; drop the key")
        return _torch_formats().TorchFolderReader(path, strip_prefix=strip_prefix)
    if kind.startswith("safetensors"):
        if key is not None:
            if fd is not None:
                os.close(fd)
            raise CheckpointError(f"{path}: is safetensors, which has no entry {key!r} to pick "
                                  "(entries exist in torch.save files only); drop the key")
        return SafetensorsReader(path, strip_prefix=strip_prefix, fd=fd, src=src)
    from ckptavg.io.pt import TorchReader  # imports torch only for what it cannot describe

    return TorchReader(path, key=key, strip_prefix=strip_prefix, mmap=kind == "torch-zip",
                       fd=fd, src=src)


def _torch_formats():
    """The readers of Hugging Face .bin folders and DCP, imported with torch on first use."""
    import_torch()
    from ckptavg.io import dcp, folder

    return SimpleNamespace(DCPReader=dcp.DCPReader, TorchFolderReader=folder.TorchFolderReader)
