"""torch.save files: weights-only unpickling, memory-mapped, nested checkpoints.

The file is opened once; torch loads it through that descriptor (`/proc/self/fd/N` names
the open file itself, not the path, so a replacement of the path is never read). Zip-format
files are mapped (`mmap=True`): tensor data stays in the file until read, and `release`
hands the pages back, so the resident set is bounded by one tensor per input. Legacy
(pre-1.6, non-zip) files cannot be mapped and are loaded whole.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import contextlib
import io
import math
import os
import pickle
import re
import struct
import sys
import types
import warnings
import zipfile
from typing import TYPE_CHECKING

import numpy as np

from ckptavg.errors import CheckpointError
from ckptavg.io.base import ReaderBase, TensorSpec
from ckptavg.io.crc import LOCAL_HEADER, RecordCheck, data_begins, no_record_at
from ckptavg.io.dtypes import DType, dtype_of, standard
from ckptavg.io.files import (
    ByteSource,
    Extent,
    OpenFile,
    SourceIdentity,
    drop_pages,
    fd_path,
    keep_descriptor,
    number_at,
    open_source,
)
from ckptavg.io.keys import (
    AVERAGED_COUNT,
    STATE_DICT_KEYS,
    find_ties,
    is_averaged_model,
    strip_keys,
)
from ckptavg.io.metadata import Position, clean_metadata, whole_number
from ckptavg.io.pickles import (
    Opaque,
    RefusedGlobal,
    carry,
    left_out,
    number,
    python3_name,
    refuse_global,
    stand_in,
)
from ckptavg.io.torchzip import LEGACY_STORAGES, METADATA_ATTR, RawTensor
from ckptavg.lazy import import_torch

if TYPE_CHECKING:
    import torch

# Top-level configuration entries carried into a torch output of the same ecosystem:
# Lightning's (load_from_checkpoint needs the version and rebuilds from the hyper-parameters)
# and fairseq's cfg/args. Optimizer, loop and callback state never are.
CARRIED = ("pytorch-lightning_version", "hparams_name", "hyper_parameters",
           "datamodule_hparams_name", "datamodule_hyper_parameters", "cfg", "args")
STEP_ENTRIES = ("global_step", "step", "num_updates", "iteration")
# tokens consumed, as training loops record them at the top of a checkpoint (a Hugging Face
# Trainer's count, torchtitan's and others' train-state names)
TOKEN_ENTRIES = ("num_input_tokens_seen", "tokens_seen", "ntokens_seen", "consumed_tokens",
                 "total_tokens", "tokens")


class _OpaqueUnpickler(pickle.Unpickler):
    """Torch's weights-only allowlist, then the one policy of io/pickles.py for any other
    global: refused by name when it could run code, else an inert stand-in. The file loads
    without importing or running anything it names."""

    allowed: dict[str, object] = {}
    path = "?"

    def find_class(self, module: str, name: str):
        obj = self.allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        refuse_global(self.path, module, name)
        return stand_in(module, name)


def _allowed_globals() -> dict[str, object]:
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(getattr(wou, "_get_user_allowed_globals", dict)())
    for obj in _safe_globals():
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return allowed


def _safe_globals() -> list:
    """Harmless globals found in common training checkpoints (plain data holders)."""
    import argparse
    import pathlib

    allowed: list = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [
            getattr(np.dtypes, n)
            for n in dir(np.dtypes)
            if n.endswith("DType") and isinstance(getattr(np.dtypes, n), type)
        ]
    except Exception:  # numpy absent or of another layout: nothing more is allowed
        pass
    return allowed


_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
                IndexError, MemoryError, OverflowError, RecursionError, pickle.UnpicklingError)
# What a malformed pickle makes torch or pickle raise, but also what a bug raises: these mean
# a bad file only when torch's or the standard library's unpickling code raised them.
_BUG_LIKE = (KeyError, TypeError, AttributeError)
_LOADER_FILES = ("pickle.py", "zipfile.py", "_compression.py", "serialization.py")


def raise_if_ours(e: BaseException) -> None:
    """Re-raise `e`, a KeyError/TypeError/AttributeError, unless the innermost frame that
    raised it is torch's or the standard library's loading code (the file's content made it
    fail): anywhere else it is a bug, ours or a caller's, and a bug is a traceback."""
    if not isinstance(e, _BUG_LIKE):
        return
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    where = last.tb_frame.f_code.co_filename if last is not None else ""
    torch = sys.modules.get("torch")
    torch_dir = os.path.dirname(torch.__file__) + os.sep if torch is not None else None
    if (torch_dir and where.startswith(torch_dir)) or os.path.basename(where) in _LOADER_FILES:
        return
    raise e


def torch_load(path: str, fd: int, mmap: bool) -> object:
    """`torch.load(weights_only=True)` of the open file `fd`, with clear errors; never an
    unsafe fallback. A zip-format file that names a class outside the allowlist (a config
    object among Lightning's hyper-parameters) is loaded again with that class replaced by an
    inert `Opaque` stand-in: the tensors are plain, and nothing the file names is imported
    or run. torch's own warnings are not passed on to the user."""
    torch = import_torch()
    ctx = (torch.serialization.safe_globals(_safe_globals())
           if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext())
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(fd_path(fd, path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not mmap or not m:  # a legacy file, or not a matter of globals: refuse
            named = _named(m.group(1)) if m else _scanned(fd)
            what = f"the global {named}" if named else \
                "content outside the weights-only allowlist"
            raise CheckpointError(
                f"{path}: refused to unpickle {what} (code named by a file is never run); "
                "re-save the weights with torch.save(model.state_dict()) or as safetensors"
            ) from None
    except _LOAD_ERRORS as e:
        raise_if_ours(e)
        raise _corrupt(path, e) from None
    unpickler = type("Unpickler", (_OpaqueUnpickler,), {"allowed": _allowed_globals(),
                                                        "path": path})
    module = types.SimpleNamespace(__name__="ckptavg_opaque_pickle", Unpickler=unpickler,
                                   load=pickle.load, loads=pickle.loads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(fd_path(fd, path), map_location="cpu", weights_only=False,
                              mmap=True, pickle_module=module)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            f"{path}: refused to unpickle the global {_named(m.group(1)) if m else '?'} (code named by "
            "a file is never run); re-save the weights with torch.save(model.state_dict()) or "
            "as safetensors"
        ) from None
    except _LOAD_ERRORS as e:
        raise_if_ours(e)
        raise _corrupt(path, e) from None


def _scanned(fd: int) -> str | None:
    """The code-running global a legacy file's pickles name (torch's unpickler stops at a
    protocol 4 or 5 opcode before it says which): read with pickletools, nothing run."""
    from ckptavg.io.pickles import first_refused

    try:
        data = os.pread(fd, 16 << 20, 0)  # the globals a refusal names come first
    except OSError:
        return None
    if data[:2] == b"PK":  # a zip: its data.pkl is what names globals
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                data = z.read(names[0]) if names else b""
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
    return first_refused(data)


def _named(dotted: str) -> str:
    """A global as torch's message gives it, by its Python 3 name."""
    module, _, name = dotted.rpartition(".")
    return ".".join(python3_name(module, name))


def _corrupt(path: str, e: BaseException) -> CheckpointError:
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return CheckpointError(f"{path}: cannot load torch checkpoint ({first}); the file is "
                           "corrupt or incomplete")


MAX_NESTING = 16  # state-dict entries inside state-dict entries (a forged file may cycle)


def find_state_dict(obj: object, key: str | None, path: str,
                    depth: int = 0) -> tuple[dict, str]:
    """(state dict, where it was found) inside a possibly nested training checkpoint."""
    if depth > MAX_NESTING:
        raise CheckpointError(f"{path}: state dict entries nested more than {MAX_NESTING} deep "
                              "(or in a cycle); name the entry that holds the weights (--key)")
    if isinstance(obj, Opaque):
        raise CheckpointError(
            f"{path}: holds a {obj.global_name} object, not a dict of tensors (weights are "
            "never read from a class ckptavg does not import); save model.state_dict() "
            "instead of the object")
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "save model.state_dict() instead of the model"
        )
    if key is not None:
        node: object = obj
        for part in key.split("/") if key not in obj else [key]:
            if not isinstance(node, dict) or isinstance(node, Opaque) or part not in node:
                raise CheckpointError(
                    f"{path}: no entry {key!r} (top-level keys: {_list(obj)}); name the entry "
                    "that holds the weights"
                )
            node = node[part]
        if isinstance(node, Opaque):
            raise CheckpointError(f"{path}: entry {key!r} {_whole_object(node)}")
        if not isinstance(node, dict) or not _has_tensor(node):
            raise CheckpointError(f"{path}: entry {key!r} holds no tensors; name another entry")
        return node, key
    if obj and all(_is_tensor(v) for v in obj.values()):
        return obj, "<top level>"
    for name in STATE_DICT_KEYS:
        node = obj.get(name)
        if isinstance(node, dict) and not isinstance(node, Opaque) and _has_tensor(node):
            if all(_is_tensor(v) for v in node.values()):
                return node, name
            inner, where = find_state_dict(node, None, path, depth + 1)
            return inner, f"{name}/{where}"
    if _has_tensor(obj) and not any(isinstance(v, dict) and _has_tensor(v) for v in obj.values()):
        return obj, "<top level>"
    objects = [k for k, v in obj.items() if isinstance(v, Opaque) and k in STATE_DICT_KEYS]
    if objects:  # {'epoch', 'model': <nn.Module>}: --key model would fail the same way
        raise CheckpointError(f"{path}: no state dict found: entry {objects[0]!r} "
                              f"{_whole_object(obj[objects[0]])}")
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {_list(obj)}); "
        "name the entry that holds the weights (--key)"
    )


def _whole_object(node: Opaque) -> str:
    return (f"holds a pickled {node.global_name} object, not a dict of tensors (weights are "
            "never read from a class ckptavg does not import); save model.state_dict() "
            "instead of the model")


def _has_tensor(d: dict) -> bool:
    return any(_is_tensor(v) for v in d.values())


def _is_tensor(v: object) -> bool:
    """A torch tensor, or a tensor the file describes (TensorRef), not yet loaded."""
    if isinstance(v, TensorRef):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(v, getattr(torch, "Tensor", ()))


def _list(d: dict, n: int = 8) -> str:
    keys = [str(k) for k in d]
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _check_tensor(path: str, key: object, t: torch.Tensor) -> None:
    """Only plain dense CPU tensors of real dtypes are weights ckptavg can average."""
    if not isinstance(key, str):
        raise CheckpointError(f"{path}: state dict has a non-string key {key!r}; "
                              "state dicts map parameter names to tensors")
    if isinstance(t, TensorRef):
        return  # described as a dense tensor of a real dtype (else torch loads the file)
    torch = import_torch()
    problem = None
    if t.layout != torch.strided:
        problem = f"is a {str(t.layout).replace('torch.', '')} tensor"
    elif t.is_meta or t.device.type == "meta":
        problem = "is a meta tensor (it has no data)"
    elif t.is_quantized:
        problem = "is a quantized tensor"
    elif t.is_complex():
        problem = f"has complex dtype {str(t.dtype).replace('torch.', '')}"
    if problem:
        raise CheckpointError(f"{path}: tensor {key!r} {problem}, which ckptavg cannot "
                              "average; convert it to a dense real tensor and re-save")


def position_of(obj: object) -> Position:
    """Epoch, step and tokens a training library wrote into the checkpoint: Lightning's
    `epoch` and `global_step`, timm's `epoch`, fairseq's train_iterator epoch and
    num_updates, a top-level token count (TOKEN_ENTRIES)."""
    if not isinstance(obj, dict):
        return Position()
    epoch, epoch_from = whole_number(number(obj.get("epoch"))), "checkpoint entry 'epoch'"
    step, step_from = None, ""
    for name in STEP_ENTRIES:
        step = whole_number(number(obj.get(name)))
        if step is not None:
            step_from = f"checkpoint entry {name!r}"
            break
    extra = obj.get("extra_state")
    if epoch is None and isinstance(extra, dict) and isinstance(extra.get("train_iterator"), dict):
        epoch = whole_number(extra["train_iterator"].get("epoch"))
        epoch_from = "checkpoint entry 'extra_state/train_iterator/epoch'"
    history = obj.get("optimizer_history")
    if step is None and isinstance(history, list) and history and isinstance(history[-1], dict):
        step = whole_number(history[-1].get("num_updates"))
        step_from = "checkpoint entry 'optimizer_history/num_updates'"
    tokens, tokens_from = None, ""
    for name in TOKEN_ENTRIES:
        tokens = whole_number(number(obj.get(name)))
        if tokens is not None and tokens >= 0:
            tokens_from = f"checkpoint entry {name!r}"
            break
        tokens = None
    return Position(epoch, step, epoch_from if epoch is not None else "",
                    step_from if step is not None else "", tokens, tokens_from)


# ------------------------------------------------------------------ reading without torch

# torch's typed storages, by the name its pickles give them.
_STORAGES = {v: k for k, v in LEGACY_STORAGES.items()}
MAX_PICKLE = 1 << 28  # a structure pickle this large is left to torch


class _Unsupported(Exception):
    """The file holds something the torch-free reader does not describe: torch loads it."""


class _Sealed:
    """A pickle's BUILD cannot set state on what the structure unpickler hands out."""

    __slots__ = ()

    def __setstate__(self, state) -> None:
        raise _Unsupported("state set on a tensor record")


class _StorageType(_Sealed):
    __slots__ = ("dtype",)

    def __init__(self, dtype: DType):
        self.dtype = dtype


class _Storage(_Sealed):
    """One storage record of the zip (`<prefix>/data/<key>`): its dtype and length, then
    where its bytes begin in the file."""

    __slots__ = ("key", "dtype", "numel", "offset", "check", "swap")

    def __init__(self, key: str, dtype: DType, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.swap = False  # stored in the other byte order (the zip's `byteorder` record)
        self.offset = -1  # in the file, once the zip directory has been read
        self.check: RecordCheck | None = None  # its CRC-32, summed as it is read


class TensorRef(_Sealed):
    """A tensor as the file's pickle describes it (storage, offset, shape, strides, dtype),
    not loaded: its bytes stay in the file until read with pread."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple,
                 dtype: DType):
        self.storage, self.offset, self.shape, self.stride, self.dtype = (
            storage, offset, shape, stride, dtype)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def is_contiguous(self) -> bool:
        expected = 1
        for d, st in zip(reversed(self.shape), reversed(self.stride)):
            if d != 1 and st != expected:
                return False
            expected *= d
        return True

    def file_offset(self) -> int:
        return self.storage.offset + self.offset * self.dtype.itemsize

    def identity(self) -> tuple | None:
        """As base.tensor_identity: equal for two names of one tensor; None when empty."""
        if self.numel() == 0:
            return None
        return (self.storage.key, self.offset, self.shape, self.stride, self.dtype.name)


def _whole(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ref(storage: object, offset: object, size: object, stride: object,
         dtype: DType) -> TensorRef:
    if not isinstance(storage, _Storage) or not _whole(offset) or offset < 0 \
            or not isinstance(size, tuple) or not isinstance(stride, tuple) \
            or len(size) != len(stride) or not all(_whole(d) and d >= 0 for d in size) \
            or not all(_whole(d) and d >= 0 for d in stride):
        raise _Unsupported("tensor")
    if storage.dtype.name == "uint8" and dtype.name != "uint8":  # untyped: bytes
        limit = storage.numel // dtype.itemsize
    elif storage.dtype != dtype:
        raise _Unsupported("dtype")
    else:
        limit = storage.numel
    t = TensorRef(storage, offset, size, stride, dtype)
    if t.numel() and offset + sum((d - 1) * st for d, st in zip(size, stride)) >= limit:
        raise _Unsupported("past its storage")
    return t


def _rebuild_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if hooks:
        raise _Unsupported("hooks")
    return _ref(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if hooks or not isinstance(dtype, DType):
        raise _Unsupported("hooks")
    return _ref(storage, offset, size, stride, dtype)


def _parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, TensorRef) or hooks or state:
        raise _Unsupported("parameter")
    return data


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _Unsupported("codec")
    return codecs.encode(text, "latin1")


class _StructureUnpickler(pickle.Unpickler):
    """Builds the checkpoint's object with a TensorRef for each tensor. It knows only plain
    containers and torch's tensor records; any other global (a class, a function, numpy)
    raises _Unsupported, and torch's weights-only loader takes the file instead. Nothing
    the file names is imported or called."""

    GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,  # protocol 2
        ("_codecs", "encode"): _latin1,  # bytes, in pickle protocol 2
    }

    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}
        self.path = path
        self.stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        found = self.GLOBALS.get((module, name))
        if found is not None:
            return found
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(standard("uint8"))
        if module == "torch" and name in _STORAGES:
            return _StorageType(standard(_STORAGES[name]))
        if module == "torch" and standard(name) is not None:
            return standard(name)  # a dtype (of _rebuild_tensor_v3)
        if module == "torch" or module.startswith("torch."):
            raise _Unsupported(f"{module}.{name}")  # torch's own loader knows its records
        refuse_global(self.path, module, name)
        key = (module, name)
        if key not in self.stand_ins:
            self.stand_ins[key] = stand_in(module, name)
        return self.stand_ins[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[3], str) and pid[3].split(":")[0] in ("cpu", "cuda")
                and _whole(pid[4]) and pid[4] >= 0):
            raise _Unsupported("storage record")
        _, kind, key, _, numel = pid
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(key, kind.dtype, numel)
        elif (st.dtype, st.numel) != (kind.dtype, numel):
            raise _Unsupported("one storage, two descriptions")
        return st


def read_structure(path: str, file: ByteSource) -> object | None:
    """The object a zip-format torch file holds, with a TensorRef for each tensor, read
    without torch. Classes the file names are inert stand-ins (io/pickles.py), and one that
    could run code refuses the file. None, for torch's loader to take, when the file holds
    a tensor record this does not describe (sparse, quantized, complex; hooks), a foreign
    byte order or compressed records.

    Only the pickle and the zip directory are read. Each storage record must be stored
    whole, inside the file, and apart from the others; every tensor must lie inside its
    record; each record gets the CRC-32 check its bytes are summed into as they are read. `file` is
    the open file, local (base.OpenFile) or in remote storage (remote.RemoteFile)."""
    try:
        with file.open() as f, zipfile.ZipFile(f) as z:
            infos = {i.filename: i for i in z.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1 or infos[pickles[0]].file_size > MAX_PICKLE:
                return None
            prefix = pickles[0][: -len("data.pkl")]
            swap = not _zip_native_order(z)
            up = _StructureUnpickler(z.read(pickles[0]), path)
            obj = up.load()
            size = file.size
            records = []
            for key, st in up.storages.items():
                st.swap = swap and st.dtype.itemsize > 1
                info = infos.get(prefix + "data/" + key)
                if info is None:
                    raise _Damaged(f"{path}: data.pkl names the record {prefix}data/{key}, "
                                   "which the zip does not hold: the file is incomplete or "
                                   "forged; re-save it")
                if info.compress_type != zipfile.ZIP_STORED:
                    return None
                need = st.numel * st.dtype.itemsize
                if info.file_size != need:
                    raise _Damaged(f"{path}: record {info.filename} holds {info.file_size} "
                                   f"bytes where data.pkl describes {need}: the file is "
                                   "damaged or forged; re-save it")
                records.append((st, info))
            # Where each record's bytes begin: for an object in remote storage, where
            # torch's writer puts them, each header confirmed before its record is read;
            # else (or when the first header says otherwise) from the local headers, all at
            # once (in parallel, nearby ones in one GET, for a remote object).
            stored = [info for _, info in records]
            placed = torch_offsets(file, stored, _alignment(z, prefix)) if file.remote else None
            offsets = placed or data_offsets(file, stored)
            for (st, info), offset in zip(records, offsets):
                st.offset = offset
                if st.offset is None:
                    raise _Damaged(no_record_at(path, info.filename, info.header_offset))
                if st.offset + info.file_size > size:
                    raise _Damaged(f"{path}: record {info.filename} runs past the end of the "
                                   "file: it is truncated or forged; re-save it")
                st.check = RecordCheck(path, info.filename, st.offset, info.file_size, info.CRC,
                                       header=info.header_offset if placed else None)
            _check_overlaps(path, up.storages.values())
    except (RefusedGlobal, _Damaged):
        raise
    except zipfile.BadZipFile as e:
        raise _Damaged(f"{path}: its zip directory cannot be read ({e}); a torch file is a zip "
                       "archive, and this one is truncated or damaged: copy or save it "
                       "again") from None
    except (_Unsupported, pickle.UnpicklingError, CheckpointError, *_LOAD_ERRORS):
        return None  # torch's loader gives its own verdict on what this reader does not know
    return obj


_UINT = {2: np.dtype("u2"), 4: np.dtype("u4"), 8: np.dtype("u8")}


class _Damaged(CheckpointError):
    """A zip whose directory contradicts its pickle or itself: torch would fail on it too."""


def data_offsets(file: ByteSource, infos: list[zipfile.ZipInfo]) -> list[int | None]:
    """Where each stored record's bytes begin in the file: after its local header, whose
    name and extra field lengths only the header itself gives; None where no header begins.
    The headers are read with one `get_many`."""
    heads = file.get_many([(i.header_offset, LOCAL_HEADER.size) for i in infos])
    return [data_begins(info.header_offset, head) for info, head in zip(infos, heads)]


def torch_offsets(file: ByteSource, infos: list[zipfile.ZipInfo],
                  alignment: int | None) -> list[int] | None:
    """Where torch's writer puts each record's bytes: after its local header, the name and
    an extra field padding them to a multiple of `alignment` (after a zip64 field for a
    record past 4 GiB or larger than it). The first record's header is read to confirm it
    (each other one is confirmed before its record is read: RecordCheck.confirm), so an
    object in remote storage opens without a GET per record. None when the layout is
    another (then every header is read: data_offsets): a zip rewritten by another tool, an
    unknown alignment."""
    if not infos or alignment is None:
        return None
    out = []
    for info in infos:
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        start = info.header_offset + LOCAL_HEADER.size + len(name) + 4  # + the field's id, size
        big, far = info.file_size >= 0xFFFFFFFF, info.header_offset >= 0xFFFFFFFF
        if big or far:  # zip64: the field's id and size, then 8 bytes per large value
            start += 4 + (16 if big else 0) + (8 if far else 0)
        out.append(-(-start // alignment) * alignment)
    first = min(range(len(infos)), key=lambda i: infos[i].header_offset)
    return out if data_offsets(file, [infos[first]]) == [out[first]] else None


def _alignment(z: zipfile.ZipFile, prefix: str) -> int | None:
    """The alignment the file's records were written with: its .storage_alignment record
    (recent torch releases write one), else 64 (torch's fixed alignment before it); None
    when that record is not a number."""
    try:
        info = z.getinfo(prefix + ".storage_alignment")
    except KeyError:
        return 64
    try:
        value = int(z.read(info)) if info.file_size <= 16 else 0
    except ValueError:
        return None
    return value if 0 < value <= 1 << 20 else None


def _check_overlaps(path: str, storages) -> None:
    """Two storage records whose bytes overlap are a forged zip (torch writes each once)."""
    spans = sorted((st.offset, st.offset + st.check.size, st.check.name) for st in storages
                   if st.check.size)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _Damaged(f"{path}: records {a} and {b} overlap in the file, which torch "
                           "never writes: the zip is forged or damaged; re-save it")


def _ref_number(file: ByteSource, path: str, t: TensorRef) -> float:
    """The value of a one-element TensorRef (AveragedModel's n_averaged)."""
    value = None
    if t.numel() == 1:
        t.storage.check.confirm(file)
        # a swapped storage holds the byte order that is not this host's
        value = number_at(file, t.file_offset(), t.dtype, big=sys.byteorder == "little") \
            if t.storage.swap else file.number(t.file_offset(), t.dtype)
    if value is None:
        raise CheckpointError(f"{path}: {AVERAGED_COUNT} is not one number")
    return value


class TorchReader(ReaderBase):
    """A torch.save file. Pass `file`/`src` when the file is already open (it is taken
    over): a local file (base.OpenFile) or an object in remote storage (remote.RemoteFile,
    read in place with ranged GETs; only what `read_structure` describes).

    A zip-format file is described without torch (`read_structure`), classes among its
    other entries as inert stand-ins: the averaging engine reads its tensors with pread and
    torch is never imported; `read` builds a torch tensor from the record's bytes. Each
    record read is checked against its CRC-32 (summed as the engine reads it in order;
    `verify` completes what was read out of order). Anything else (legacy files, compressed
    records, tensor kinds the structure reader does not describe) goes through torch's
    weights-only loader (`torch_load`, the file mapped)."""

    def __init__(self, path: str, key: str | None = None, strip_prefix: str | None = None,
                 mmap: bool = True, file: ByteSource | None = None, src: SourceIdentity | None = None):
        self.path = path
        self.format = "torch" if mmap else "torch-legacy"
        self._mmap = mmap
        self._key = key
        if file is None:
            file, src = OpenFile.of(path)
        self._file: ByteSource | None = None  # kept open while tensors are read through it
        self._tensors_of: _Described | _Loaded | None = None  # the reader's tensors
        try:
            obj = read_structure(path, file) if mmap and (
                file.remote or keep_descriptor(file.fd)) else None
            if obj is None and file.remote:
                raise CheckpointError(
                    f"{path}: this torch file needs torch's own loader (a legacy or "
                    "compressed file, or tensors of a kind only torch reads), which reads "
                    "local files only; copy it to local disk first, or save it as safetensors")
            if obj is None:
                # torch swaps a foreign-order file's bytes as it loads it, which its mapped
                # loading does not do for every storage: such a file is loaded whole.
                obj = torch_load(path, file.fd, mmap=mmap and _native_order(file))
            self.files = [src]
            state, self.location = find_state_dict(obj, key, path)
            left: list[str] = []
            bare = state is obj  # the weights at the top level, maybe beside plain values
            # a bare state dict keeps our metadata as an attribute (torchzip.BareState)
            found = getattr(obj, METADATA_ATTR, None) if bare else None
            self._meta = clean_metadata(found if isinstance(found, dict) else obj.get("metadata"),
                                        left) if isinstance(obj, dict) else {}
            self.read_notes = tuple(left)
            self._position = position_of(obj)
            top = obj if isinstance(obj, dict) else {}
            self._scalars = {str(k): float(n) for k, n in
                             ((k, number(v)) for k, v in top.items())
                             if n is not None and not (bare and _is_tensor(top[k]))}
            self._carry(top)
            # Entries besides the weights and our metadata (optimizer, loops, configs).
            self.other_entries = tuple(str(k) for k, v in top.items()
                                       if v is not state and k != "metadata"
                                       and not (bare and _is_tensor(v)))
            self.others = tuple(k for k, v in obj.items() if isinstance(v, dict) and v is not state
                                and _has_tensor(v)) if isinstance(obj, dict) else ()
            # Optimizer state, epochs, configs: never averaged, never copied.
            self._tensors: dict = {}
            for k, v in state.items():
                if _is_tensor(v):
                    _check_tensor(path, k, v)
                    self._tensors[k] = v
            if is_averaged_model(list(self._tensors)):
                count = self._tensors.pop(AVERAGED_COUNT)
                value = _ref_number(file, path, count) if isinstance(count, TensorRef) \
                    else count.item()
                if not math.isfinite(value) or value != int(value):
                    raise CheckpointError(f"{path}: {AVERAGED_COUNT} is {value}, not a count "
                                          "of models; the file is damaged")
                self.averaged_count = int(value)
                self._meta.setdefault("swa.n_averaged", str(int(value)))
            self._names, removed = strip_keys(list(self._tensors), strip_prefix, path)
            self.removed_prefixes = tuple(removed)
            self._ties = find_ties({public: self._tensors[raw] for public, raw in self._names.items()})
            if any(isinstance(t, TensorRef) for t in self._tensors.values()):
                self._file = file  # read_structure ran only with a descriptor to keep
                self._tensors_of = _Described(self._tensors, file, self._names)
            else:
                self._tensors_of = _Loaded(self._tensors, file, src, mmap, path)
                self._file = self._tensors_of.file
            del self._tensors
        finally:
            if self._file is None:
                file.close()

    def _carry(self, top: dict) -> None:
        """The carried entries (CARRIED) as plain values; notes on what was converted."""
        torch = sys.modules.get("torch")
        keep = (TensorRef,) + ((torch.Tensor,) if torch is not None else ())
        self._extras: dict[str, object] = {}
        dropped, notes = [], []
        for k in CARRIED:
            if k not in top:
                continue
            value, said = carry(top[k], keep)
            if left_out(value):
                dropped.append(k)
            else:
                self._extras[k] = value
            notes += [f"entry {k!r}: {n}" for n in said]
        self.dropped_extras = tuple(dropped)
        self.extras_notes = tuple(notes)

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def info(self, key: str) -> TensorSpec:
        t = self._tensors_of.tensors[self._raw(key)]
        return TensorSpec(key, tuple(t.shape), t.dtype)

    def read(self, key: str) -> torch.Tensor:
        """The tensor (torch imported now): built from its record's bytes, read once and
        checked whole; for a torch-loaded file, torch's mapped tensor, its record checked."""
        return self._tensors_of.read(self._raw(key))

    def locate(self, key: str) -> Extent | None:
        return self._tensors_of.locate(self._raw(key))

    def verify(self) -> None:
        """Complete the CRC-32 check of every record read in part or out of order."""
        self._tensors_of.verify()

    def release(self, key: str) -> None:
        self._tensors_of.release(self._raw(key))

    def release_range(self, key: str, start: int, nbytes: int) -> None:
        self._tensors_of.release_range(self._raw(key), start, nbytes)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def position(self) -> Position:
        return self._position.merged(super().position())

    def extras(self) -> dict[str, object]:
        """The carried entries as plain values, each tensor among them as a RawTensor (its
        record read and checked), so a torch output can be written without torch."""
        memo: dict[int, object] = {}

        def raw(x: object) -> object:
            if isinstance(x, TensorRef):
                return RawTensor(x.dtype, x.shape, self._tensors_of.ref_bytes(x))
            if _is_tensor(x):
                t = x.detach().contiguous()
                return RawTensor(dtype_of(t.dtype), tuple(t.shape),
                                 t.reshape(-1).view(import_torch().uint8).numpy().tobytes())
            if id(x) in memo:
                return memo[id(x)]
            if type(x) is dict:
                out: dict = {}
                memo[id(x)] = out
                out.update((k, raw(v)) for k, v in x.items())
                return out
            if type(x) is list:
                items: list = []
                memo[id(x)] = items
                items.extend(raw(v) for v in x)
                return items
            if type(x) is tuple:
                return tuple(raw(v) for v in x)
            return x

        return {k: raw(v) for k, v in self._extras.items()}

    def scalars(self) -> dict[str, float]:
        return dict(self._scalars)

    def close(self) -> None:
        if self._tensors_of is not None:
            self._tensors_of.close()
        if self._file is not None:
            self._file.close()
            self._file = None


class _Described:
    """The tensors of a file `read_structure` described, without torch: each a TensorRef
    (record, offset, shape, strides), read with pread through the reader's file; a record
    is read once whole (and checked) for `read`, or located for the engine's pread, its
    CRC-32 summed in order as it is read."""

    def __init__(self, refs: dict, file: ByteSource, names: dict[str, str]):
        self.tensors: dict[str, TensorRef] = dict(refs)  # raw name -> where it lies
        self.file = file
        self.records: dict[str, np.ndarray] = {}  # storage key -> its bytes, while read
        for public, raw in names.items():  # what each record holds, for errors
            check = self.tensors[raw].storage.check
            check.holds = check.holds or f"tensor {public!r}"

    def read(self, raw: str) -> torch.Tensor:
        torch = import_torch()
        ref = self.tensors[raw]
        if not ref.numel():
            return torch.empty(ref.shape, dtype=ref.dtype.torch)
        data = self.record(ref.storage)
        flat = torch.from_numpy(data)
        size = ref.dtype.itemsize
        if size > 1:
            flat = flat[: len(data) // size * size]
        return flat.view(ref.dtype.torch).as_strided(ref.shape, ref.stride, ref.offset)

    def record(self, st: _Storage) -> np.ndarray:
        data = self.records.get(st.key)
        if data is None:
            data = np.empty(st.check.size, np.uint8)
            st.check.confirm(self.file, ahead=True)
            self.file.pread(memoryview(data), st.offset)
            st.check.whole(data)
            if st.swap:  # big-endian on disk (or little on a big-endian machine): swapped here
                data = data.view(_UINT[st.dtype.itemsize]).byteswap().view(np.uint8)
            self.records[st.key] = data
        return data

    def locate(self, raw: str) -> Extent | None:
        ref = self.tensors[raw]
        if not ref.numel() or not ref.is_contiguous() or ref.storage.swap:
            return None  # read (and swapped) by `read`
        return self.file.extent(ref.file_offset(), ref.storage.check)

    def verify(self) -> None:
        checks = {id(r.storage.check): r.storage.check for r in self.tensors.values()
                  if r.storage.check is not None}
        for check in checks.values():
            if check.started and not check.done:
                check.finish(self.file)

    def release(self, raw: str) -> None:
        self.records.pop(self.tensors[raw].storage.key, None)

    def release_range(self, raw: str, start: int, nbytes: int) -> None:
        return None  # nothing is mapped: records are read into buffers and released whole

    def ref_bytes(self, ref: TensorRef) -> bytes:
        """A described tensor's bytes in C order, from its checked record."""
        if not ref.numel():
            return b""
        data = self.record(ref.storage)
        size = ref.dtype.itemsize
        elems = np.lib.stride_tricks.as_strided(
            data[ref.offset * size:].view(f"V{size}"), ref.shape,
            tuple(st * size for st in ref.stride), writeable=False)
        out = np.ascontiguousarray(elems).tobytes()
        self.records.pop(ref.storage.key, None)
        return out

    def close(self) -> None:
        self.tensors, self.records = {}, {}


class _Loaded:
    """The tensors of a file torch's weights-only loader read (mapped when `mmap`): where
    torch's map of the file lies is found, so that a tensor can be located in the file and
    read with pread, each zip record checked against its CRC-32; pages are handed back as
    they are done."""

    def __init__(self, tensors: dict, file: ByteSource, src: SourceIdentity, mmap: bool, path: str):
        self.tensors = dict(tensors)
        self.mmap = mmap
        self.file: ByteSource | None = None  # kept only to read tensors with pread
        self.checks: list[RecordCheck] = []  # the zip's records, by offset
        self.offsets: list[int] = []  # where each of them begins (for bisect)
        self.lowest = _lowest_storage(self.tensors)
        self.base = _map_start(self.lowest, file, src) if mmap and self.lowest else None
        if self.base is not None and keep_descriptor(file.fd):
            self.file = file  # tensors are then read with pread (see locate)
            self.checks = zip_checks(file, path)
            self.offsets = [c.offset for c in self.checks]

    def _check_at(self, offset: int) -> RecordCheck | None:
        """The record that holds the byte at `offset`."""
        i = bisect.bisect_right(self.offsets, offset) - 1
        if i >= 0 and offset < self.checks[i].offset + self.checks[i].size:
            return self.checks[i]
        return None

    def read(self, raw: str) -> torch.Tensor:
        t = self.tensors[raw]
        if self.checks and t.numel():
            check = self._check_at(t.untyped_storage().data_ptr() - self.base)
            if check is not None:
                check.finish(self.file)
        return t

    def locate(self, raw: str) -> Extent | None:
        t = self.tensors[raw]
        if self.file is None or not t.numel() or not t.is_contiguous():
            return None
        offset = t.data_ptr() - self.base
        return self.file.extent(offset, self._check_at(offset))

    def verify(self) -> None:
        for check in self.checks:
            if check.started and not check.done:
                check.finish(self.file)

    def release(self, raw: str) -> None:
        if self.mmap and self.tensors:
            storage = self.tensors[raw].untyped_storage()
            drop_pages(storage.data_ptr(), storage.nbytes())

    def release_range(self, raw: str, start: int, nbytes: int) -> None:
        if self.mmap and self.tensors:
            t = self.tensors[raw]
            # `start` may be negative: pages of the file before this tensor, never before the
            # file's first storage (all storages are views of one map of the file).
            lo = max(t.data_ptr() + start, self.lowest)
            drop_pages(lo, t.data_ptr() + start + nbytes - lo)

    def ref_bytes(self, ref: TensorRef) -> bytes:
        raise RuntimeError("a torch-loaded file holds no described tensors")

    def close(self) -> None:
        self.tensors = {}


def zip_checks(file: ByteSource, path: str) -> list[RecordCheck]:
    """A CRC-32 check for each stored record of a zip, sorted by where its data begins."""
    checks = []
    try:
        with file.open() as f, zipfile.ZipFile(f) as z:
            stored = [i for i in z.infolist() if i.compress_type == zipfile.ZIP_STORED]
            for info, offset in zip(stored, data_offsets(file, stored)):
                if offset is not None:
                    checks.append(RecordCheck(path, info.filename, offset, info.file_size,
                                              info.CRC))
    except (OSError, zipfile.BadZipFile, ValueError, struct.error):
        return []
    return sorted(checks, key=lambda c: c.offset)


def _lowest_storage(tensors: dict) -> int:
    """The lowest address of the (mapped) storages of `tensors`; 0 when all are empty."""
    return min((t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()),
               default=0)


def _map_start(ptr: int, file: ByteSource, src: SourceIdentity) -> int | None:
    """The address at which byte 0 of the file would lie in the map torch made of it, so that
    a tensor's file offset is its address minus this; None where it cannot be established
    (not Linux, or the file's storages were byte-swapped on load: their bytes in the file are
    not the tensor's).

    Found from /proc/self/maps: the mapping that holds `ptr` (a storage of the file), checked
    to be of this file's inode."""
    if not _native_order(file):
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, offset, _, inode = line.split(None, 5)[:5]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= ptr < hi:
                    return lo - int(offset, 16) if int(inode) == src.identity[1] else None
    except (OSError, ValueError):
        return None
    return None


def _native_order(file: ByteSource) -> bool:
    """Whether the zip's `byteorder` record, if any, is this machine's (torch swaps the
    bytes of a foreign-order file on load, in memory only). Read through the open file."""
    try:
        with file.open() as f, zipfile.ZipFile(f) as z:
            return _zip_native_order(z)
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return False


def _zip_native_order(z: zipfile.ZipFile) -> bool:
    names = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
    return not names or z.read(names[0]).decode(errors="replace") == sys.byteorder


def load_torch_file(path: str) -> object:
    """The whole object of a torch file, weights-only (for callers that need it all)."""
    path = os.fspath(path)
    fd, _ = open_source(path)
    try:
        return torch_load(path, fd, mmap=False)
    finally:
        os.close(fd)
