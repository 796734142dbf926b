"""What every checkpoint format shares: tensor specs (`TensorSpec`) and the reader base
(`ReaderBase`). The files under a reader are in io/files.py, folders and indexes in
io/folders.py, key handling in io/keys.py, metadata and positions in io/metadata.py.
Formats import these modules; a format imports another only where it builds on it (a
folder of torch shards on the torch reader, DCP on the sharded writer)."""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError
from ckptavg.io.dtypes import (
    DType,
    dtype_of,
)
from ckptavg.io.files import Extent, SourceFile, check_unchanged, fingerprint
from ckptavg.io.folders import Folder, trainer_state_position
from ckptavg.io.metadata import Position

if TYPE_CHECKING:
    import torch


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


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
