"""Where an output goes and which writer writes it: `make_writer`, after the output policy
(`writer.output_kind`, `writer.check_output`). It imports every writer, the DCP one
included, so that io/writer.py (the writers) and io/dcp.py (which builds on the sharded
writer) import neither this module nor each other in a circle.

What an output's place allows (`records_content`, `staged`, `check_streamed_once`,
`running_average`) is decided here, so the engine never asks whether a path is local or an
object in a store."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io import remote
from ckptavg.io.base import TensorSpec
from ckptavg.io.files import SourceFile
from ckptavg.io.remote import is_remote
from ckptavg.io.writer import (
    RemoteShardedWriter,
    SafetensorsWriter,
    ShardedWriter,
    TorchWriter,
    Writer,
    check_output,
    output_kind,
)


def make_writer(path: str, specs: list[TensorSpec], metadata: dict[str, str],
                shard_size: int | None = None, ties: dict[str, str] | None = None,
                inputs: Iterable[SourceFile] = (), entry: str | None = "state_dict",
                extras: dict | None = None, side_files: dict[str, bytes] | None = None,
                dcp: bool = False, run: dict | None = None,
                resume: bool = False, overwrite: bool | None = None, group=None) -> Writer:
    """The writer that the output path's suffix asks for, after `check_output`.

    `entry` and `extras` shape a torch output (see TorchWriter); `side_files` (name ->
    bytes, names from SIDE_FILES) go into a folder output. `group` (torchrun's ranks, a
    `parallel.Group`): every rank writes its share of a folder output (ShardedWriter). Use
    it as a context manager: `with make_writer(...) as w: w.write(key, t)` commits on a
    clean exit and leaves nothing behind on an error."""
    path = remote.local_path(path)
    kind = output_kind(path, shard_size, dcp)
    check_output(path, kind, inputs, overwrite)
    if group is not None and (kind not in ("sharded", "dcp") or is_remote(path)):
        raise RuntimeError("torchrun's ranks write a local folder output")
    if is_remote(path):
        if kind == "sharded":
            return RemoteShardedWriter(path, specs, metadata, shard_size or 5 * 10**9,
                                       side_files)
        if kind == "dcp" or run is not None:
            raise RuntimeError("a remote output is written once, as safetensors or torch")
    if kind == "dcp":
        from ckptavg.io.dcp import DcpWriter

        if run is None:
            raise RuntimeError("a DCP output is staged: pass the run (staging.describe)")
        return DcpWriter(path, specs, metadata, ties, entry if entry in ("state_dict", "model")
                         else None, run, resume, group)
    if kind == "torch":
        return TorchWriter(path, specs, metadata, ties, entry, extras)
    if kind == "sharded":
        return ShardedWriter(path, specs, metadata, shard_size or 5 * 10**9, side_files, run,
                             resume, group)
    return SafetensorsWriter(path, specs, metadata)


CONTENT_KINDS = ("safetensors", "torch", "sharded", "dcp")


def normalised(path: str | os.PathLike) -> str:
    """An output or running average's path in one spelling (`file://` is the local path)."""
    return remote.local_path(os.fspath(path))


def records_content(path: str | None, kind: str | None) -> bool:
    """Whether the output records its inputs' content hashes, filled in before its commit
    (a local file, folder or DCP checkpoint; an object is streamed once, its metadata first)."""
    return path is not None and kind in CONTENT_KINDS and not is_remote(path)


def staged(path: str | None, kind: str | None) -> bool:
    """Whether a folder output is built in a resumable staging folder beside it (local)."""
    return path is not None and kind in ("sharded", "dcp") and not is_remote(path)


def check_streamed_once(path: str, ranked: bool, **options) -> None:
    """Refuse, for an output in object storage, what needs a local one: each option in
    `options` that is set (into, resume, dcp, sweep), and torchrun (`ranked`). A remote
    output is written once, whole, by one process."""
    if not is_remote(path):
        return
    for name in ("into", "resume", "sweep"):
        if options.get(name):
            raise OptionError((name, "output"), "work on local files; a remote output is "
                              "written once, whole: average into a local path first")
    if options.get("dcp") or ranked:
        raise OptionError("output", "a remote output is written by one process as "
                          "safetensors, a torch file or a folder of safetensors shards; under "
                          "torchrun or with --dcp, write a local folder and copy it", path)


def running_average(into: str | os.PathLike) -> str:
    """The running average `--into` names, checked: a local file (it is updated under an
    exclusive file lock) that exists."""
    into = normalised(into)
    if is_remote(into):
        raise OptionError("into", "folding into a running average in object storage is not "
                          "supported (it is updated under an exclusive file lock): fold into "
                          "a local copy, then upload it", into)
    if not os.path.exists(into):
        raise CkptavgError(f"{into}: no such file; folding into a running average needs an "
                           "existing one (make the first with an output, -o)")
    return into
