"""Where an output goes and which writer writes it: `make_writer`, after the output policy
(`writer.output_kind`, `writer.check_output`). It imports every writer, the DCP one
included, so that io/writer.py (the writers) and io/dcp.py (which builds on the sharded
writer) import neither this module nor each other in a circle."""

from __future__ import annotations

from collections.abc import Iterable

from ckptavg.io import remote
from ckptavg.io.base import SourceFile, TensorSpec
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
                resume: bool = False, overwrite: bool | None = None) -> Writer:
    """The writer that the output path's suffix asks for, after `check_output`.

    `entry` and `extras` shape a torch output (see TorchWriter); `side_files` (name ->
    bytes, names from SIDE_FILES) go into a folder output. Use it as a context
    manager: `with make_writer(...) as w: w.write(key, t)` commits on a clean exit and
    leaves nothing behind on an error."""
    path = remote.local_path(path)
    kind = output_kind(path, shard_size, dcp)
    check_output(path, kind, inputs, overwrite)
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
                         else None, run, resume)
    if kind == "torch":
        return TorchWriter(path, specs, metadata, ties, entry, extras)
    if kind == "sharded":
        return ShardedWriter(path, specs, metadata, shard_size or 5 * 10**9, side_files, run,
                             resume)
    return SafetensorsWriter(path, specs, metadata)
