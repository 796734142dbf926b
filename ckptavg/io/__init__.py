"""Checkpoint formats behind one small interface.

`open_checkpoint(path)` opens the file once, tells its format by content and hands the open
file (or the folder) to that format's reader; a path in object storage is opened the same
way, as a remote.RemoteFile or RemoteFolder (base.py holds what the formats share: the
reader base and tensor specs; files.py the files under them, folders.py folders and
indexes, keys.py key handling, metadata.py metadata and positions).
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

from ckptavg.errors import CheckpointError
from ckptavg.io import remote
from ckptavg.io.base import TORCH_SUFFIXES, ReaderBase, TensorSpec
from ckptavg.io.files import ByteSource, OpenFile, SourceFile, SourceIdentity
from ckptavg.io.folders import BIN_INDEX_NAME, BIN_NAME, INDEX_NAME, Folder, is_dcp_folder
from ckptavg.io.outputs import make_writer
from ckptavg.io.remote import is_remote
from ckptavg.io.safetensors import MAX_HEADER, SafetensorsReader
from ckptavg.lazy import import_torch

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


def _folder_kind(folder: Folder) -> str:
    if folder.has(INDEX_NAME):
        return "safetensors-sharded"
    if folder.has("model.safetensors"):
        return "safetensors-folder"
    if folder.has(BIN_INDEX_NAME):
        return "torch-sharded"
    if folder.has(BIN_NAME):
        return "torch-folder"
    if is_dcp_folder(folder):
        return "dcp"
    found = folder.names()
    suffixes = Counter(os.path.splitext(n)[1] for n in found
                       if n.lower().endswith((".safetensors", *TORCH_SUFFIXES)))
    pattern = folder.join("*" + (suffixes.most_common(1)[0][0] if suffixes
                                 else ".safetensors"))
    raise CheckpointError(
        f"{folder.path}: folder has no {INDEX_NAME}, model.safetensors, {BIN_INDEX_NAME}, "
        f"{BIN_NAME} or DCP .metadata (it holds: {', '.join(found[:5]) or 'nothing'}"
        f"{', ...' if len(found) > 5 else ''}); to average the files in it, pass them: "
        f"'{pattern}'"
    )


@dataclass
class _Found:
    """What a path names, told by content: its format, and the open file or the folder."""

    kind: str
    file: ByteSource | None = None  # an open file (base.OpenFile, remote.RemoteFile)
    src: SourceIdentity | None = None
    folder: Folder | None = None  # a folder (base.Folder, remote.RemoteFolder)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _classify(path: str) -> _Found:
    """The format of `path` (a local path or a remote URL) and its open file or folder.
    Anything that is not a regular file or a folder is refused by `open_source` before it
    is read."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".distcp") or name == ".metadata":
        folder = path.rstrip("/")[: -len(name)] or "./"
        raise CheckpointError(
            f"{path}: one file of a torch.distributed.checkpoint (DCP) folder, which is read "
            f"whole: pass the folder, {folder}")
    if is_remote(path):
        where = remote.locate(path)
        if isinstance(where, remote.RemoteFolder):
            return _Found(_folder_kind(where), folder=where)
        file, src = where, where
    else:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file; check the path or glob") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        if stat.S_ISDIR(mode):
            folder = Folder(path)
            return _Found(_folder_kind(folder), folder=folder)
        file, src = OpenFile.of(path)
    try:
        kind = sniff_bytes(file.get(0, min(16, src.size)))
    except BaseException:
        file.close()
        raise
    if kind is None:
        file.close()
        raise CheckpointError(
            f"{path}: not a checkpoint ckptavg can read (expected safetensors or a torch.save "
            f"file such as {', '.join(TORCH_SUFFIXES[:4])}); check the file"
        )
    return _Found(kind, file, src)


def sniff(path: str) -> str:
    """The format of `path` by content: 'safetensors', 'torch-zip', 'torch-legacy' for a
    file; 'safetensors-sharded', 'safetensors-folder', 'torch-sharded', 'torch-folder' or
    'dcp' for a folder. Raises CheckpointError for anything else (naming the fix)."""
    found = _classify(path)
    found.close()
    return found.kind


def open_checkpoint(path: str | os.PathLike, key: str | None = None,
                    strip_prefix: str | None = None) -> ReaderBase:
    """Open a checkpoint for streaming reads.

    Args:
        path: a safetensors file, a sharded safetensors folder, a torch.save file, a
            Hugging Face .bin folder or a DCP folder; on local disk, or in object storage
            (`s3://...`, any fsspec URL: read in place with ranged GETs).
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
    found = _classify(path)
    # A folder's readers are named by the folder (a remote one without its trailing '/').
    reader = _open(found.folder.path if found.folder is not None else path, found, key,
                   strip_prefix)  # takes the open file over
    if found.file is not None and found.file.remote:
        reader.folder = remote.parent(found.file)  # a trainer_state.json beside it
    return reader


def _open(path: str, found: _Found, key: str | None, strip_prefix: str | None) -> ReaderBase:
    kind, file, src, folder = found.kind, found.file, found.src, found.folder
    if kind == "dcp":
        return _torch_formats().DCPReader(path, key=key, strip_prefix=strip_prefix,
                                          folder=folder)
    if kind in ("torch-folder", "torch-sharded"):
        if key is not None:
            raise CheckpointError(f"{path}: a Hugging Face folder holds plain state dicts, with "
                                  f"no entry {key!r} to pick; drop the key")
        return _torch_formats().TorchFolderReader(path, strip_prefix=strip_prefix,
                                                  folder=folder)
    if kind.startswith("safetensors"):
        if key is not None:
            found.close()
            raise CheckpointError(f"{path}: is safetensors, which has no entry {key!r} to pick "
                                  "(entries exist in torch.save files only); drop the key")
        return SafetensorsReader(path, strip_prefix, file=file, src=src, folder=folder)
    from ckptavg.io.pt import TorchReader  # imports torch only for what it cannot describe

    return TorchReader(path, key=key, strip_prefix=strip_prefix, mmap=kind == "torch-zip",
                       file=file, src=src)


def _torch_formats():
    """The readers of Hugging Face .bin folders and DCP, imported with torch on first use."""
    import_torch()
    from ckptavg.io import dcp, folder

    return SimpleNamespace(DCPReader=dcp.DCPReader, TorchFolderReader=folder.TorchFolderReader)
