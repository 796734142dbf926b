"""torch.save files: weights-only unpickling, memory-mapped, nested checkpoints.

The file is opened once; torch loads it through that descriptor (`/proc/self/fd/N` names
the open file itself, not the path, so a replacement of the path is never read). Zip-format
files are mapped (`mmap=True`): tensor data stays in the file until read, and `release`
hands the pages back, so the resident set is bounded by one tensor per input. Legacy
(pre-1.6, non-zip) files cannot be mapped and are loaded whole.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import io
import os
import pickle
import re
import struct
import sys
import types
import warnings
import zipfile
from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError
from ckptavg.io.base import (
    AVERAGED_COUNT,
    STATE_DICT_KEYS,
    DType,
    Extent,
    Position,
    ReaderBase,
    SourceFile,
    TensorSpec,
    clean_metadata,
    drop_pages,
    fd_path,
    find_ties,
    import_torch,
    is_averaged_model,
    keep_descriptor,
    open_source,
    pread_exact,
    pread_number,
    strip_keys,
    whole_number,
)
from ckptavg.io.dtypes import standard

if TYPE_CHECKING:
    import torch

# Top-level configuration entries carried into a torch output of the same ecosystem:
# Lightning's (load_from_checkpoint needs the version and rebuilds from the hyper-parameters)
# and fairseq's cfg/args. Optimizer, loop and callback state never are.
CARRIED = ("pytorch-lightning_version", "hparams_name", "hyper_parameters",
           "datamodule_hparams_name", "datamodule_hyper_parameters", "cfg", "args")
STEP_ENTRIES = ("global_step", "step", "num_updates", "iteration")


class Opaque(dict):
    """Stands in for an object of a class the file names but ckptavg never imports (a
    user's config class in a Lightning checkpoint's hyper-parameters). Holds what the
    pickle gave it; nothing of the class runs."""

    global_name = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}, not imported>"


def _opaque(module: str, name: str) -> type:
    return type(name, (Opaque,), {"global_name": f"{module}.{name}", "__module__": __name__})


def _allowed_globals() -> dict[str, object]:
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update(getattr(wou, "_get_user_allowed_globals", dict)())
    for obj in _safe_globals():
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return allowed


# A standard-library global outside the allowlist (os.system, subprocess.Popen, eval) is
# never a user's data class: such a file is refused, not loaded with a stand-in.
_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy"}


class _OpaqueUnpickler(pickle.Unpickler):
    """Torch's weights-only allowlist, and an Opaque stand-in for any other global outside
    the standard library: the file loads without importing or running anything it names."""

    allowed: dict[str, object] = {}

    def find_class(self, module: str, name: str):
        obj = self.allowed.get(f"{module}.{name}")
        if obj is not None:
            return obj
        if module.split(".")[0] in _STDLIB:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return _opaque(module, name)


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
            what = f"the global {m.group(1)}" if m else "content outside the weights-only allowlist"
            raise CheckpointError(
                f"{path}: refused to unpickle {what} (code named by a file is never run); "
                "re-save the weights with torch.save(model.state_dict()) or as safetensors"
            ) from None
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None
    unpickler = type("Unpickler", (_OpaqueUnpickler,), {"allowed": _allowed_globals()})
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
            f"{path}: refused to unpickle the global {m.group(1) if m else '?'} (code named by "
            "a file is never run); re-save the weights with torch.save(model.state_dict()) or "
            "as safetensors"
        ) from None
    except _LOAD_ERRORS as e:
        raise _corrupt(path, e) from None


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
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "save model.state_dict() instead of the model"
        )
    if key is not None:
        node: object = obj
        for part in key.split("/") if key not in obj else [key]:
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(
                    f"{path}: no entry {key!r} (top-level keys: {_list(obj)}); name the entry "
                    "that holds the weights"
                )
            node = node[part]
        if not isinstance(node, dict) or not _has_tensor(node):
            raise CheckpointError(f"{path}: entry {key!r} holds no tensors; name another entry")
        return node, key
    if obj and all(_is_tensor(v) for v in obj.values()):
        return obj, "<top level>"
    for name in STATE_DICT_KEYS:
        node = obj.get(name)
        if isinstance(node, dict) and _has_tensor(node):
            if all(_is_tensor(v) for v in node.values()):
                return node, name
            inner, where = find_state_dict(node, None, path, depth + 1)
            return inner, f"{name}/{where}"
    if _has_tensor(obj) and not any(isinstance(v, dict) and _has_tensor(v) for v in obj.values()):
        return obj, "<top level>"
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {_list(obj)}); "
        "name the entry that holds the weights (--key)"
    )


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
    """Epoch and step a training library wrote into the checkpoint: Lightning's `epoch` and
    `global_step`, timm's `epoch`, fairseq's train_iterator epoch and num_updates."""
    if not isinstance(obj, dict):
        return Position()
    epoch, epoch_from = whole_number(obj.get("epoch")), "checkpoint entry 'epoch'"
    step, step_from = None, ""
    for name in STEP_ENTRIES:
        step = whole_number(obj.get(name))
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
    return Position(epoch, step, epoch_from if epoch is not None else "",
                    step_from if step is not None else "")


MAX_DEPTH = 100  # containers inside containers, in an entry carried into a .pt output


def scan(obj: object) -> set[str]:
    """What an entry of a loaded file holds, walked without recursion (a forged pickle can
    nest a list 10^5 deep, or put a list inside itself): "opaque" (a class ckptavg did not
    import), "ref" (a tensor not loaded yet) and "deep" (nested past MAX_DEPTH)."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, Opaque):
            found.add("opaque")
        elif isinstance(x, TensorRef):
            found.add("ref")
        elif isinstance(x, (dict, list, tuple, set, frozenset)) and id(x) not in seen:
            seen.add(id(x))
            if depth >= MAX_DEPTH:
                found.add("deep")
                continue
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return found


# ------------------------------------------------------------------ reading without torch

# torch's typed storages, by the name its pickles give them.
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
             "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
             "BoolStorage": "bool"}
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

    __slots__ = ("key", "dtype", "numel", "offset")

    def __init__(self, key: str, dtype: DType, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.offset = -1  # in the file, once the zip directory has been read


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

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

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
        raise _Unsupported(f"{module}.{name}")

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


_LOCAL_HEADER = struct.Struct("<4s22sHH")  # signature, fields, name length, extra length


def read_structure(path: str, fd: int) -> object | None:
    """The object a zip-format torch file holds, with a TensorRef for each tensor, read
    without torch; None when it holds anything else (a class, numpy values, a tensor that
    is not dense and real, a foreign byte order, compressed records): torch loads those.

    Only the pickle and the zip directory are read; every tensor is checked to lie inside
    its storage record, which is checked to be stored uncompressed and whole."""
    try:
        with open(fd_path(fd, path), "rb") as f, zipfile.ZipFile(f) as z:
            infos = {i.filename: i for i in z.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1 or infos[pickles[0]].file_size > MAX_PICKLE:
                return None
            prefix = pickles[0][: -len("data.pkl")]
            if not _zip_native_order(z):
                return None
            up = _StructureUnpickler(z.read(pickles[0]))
            obj = up.load()
            size = os.fstat(fd).st_size
            for key, st in up.storages.items():
                info = infos.get(prefix + "data/" + key)
                if info is None or info.compress_type != zipfile.ZIP_STORED \
                        or info.file_size != st.numel * st.dtype.itemsize:
                    return None
                sig, _, n_name, n_extra = _LOCAL_HEADER.unpack(
                    pread_exact(fd, _LOCAL_HEADER.size, info.header_offset, path))
                if sig != b"PK\x03\x04":
                    return None
                st.offset = info.header_offset + _LOCAL_HEADER.size + n_name + n_extra
                if st.offset + info.file_size > size:
                    return None
    except (_Unsupported, pickle.UnpicklingError, zipfile.BadZipFile, CheckpointError,
            *_LOAD_ERRORS):
        return None
    return obj


def _ref_number(fd: int, path: str, t: TensorRef) -> float:
    """The value of a one-element TensorRef (AveragedModel's n_averaged)."""
    value = pread_number(fd, t.file_offset(), t.dtype, path) if t.numel() == 1 else None
    if value is None:
        raise CheckpointError(f"{path}: {AVERAGED_COUNT} is not one number")
    return value


class TorchReader(ReaderBase):
    """A torch.save file. Pass `fd`/`src` when the file is already open (it is taken over).

    A zip-format file of plain containers and tensors is described without torch
    (`read_structure`): the averaging engine reads its tensors with pread and torch is never
    imported. Anything else, and any caller that asks for a tensor itself (`read`), goes
    through torch's weights-only loader (`torch_load`, the file mapped)."""

    def __init__(self, path: str, key: str | None = None, strip_prefix: str | None = None,
                 mmap: bool = True, fd: int | None = None, src: SourceFile | None = None):
        self.path = path
        self.format = "torch" if mmap else "torch-legacy"
        self._mmap = mmap
        self._key = key
        if fd is None:
            fd, src = open_source(path)
        self._fd = None
        self._refs: dict[str, TensorRef] = {}  # raw name -> where it lies (torch-free)
        self._torch_object = None  # what torch loads, once a caller needs torch's tensors
        try:
            obj = read_structure(path, fd) if mmap and keep_descriptor(fd) else None
            if obj is None:
                obj = torch_load(path, fd, mmap=mmap)
            self.files = [src]
            state, self.location = find_state_dict(obj, key, path)
            self._meta = clean_metadata(obj.get("metadata")) if isinstance(obj, dict) else {}
            self._position = position_of(obj)
            top = obj if isinstance(obj, dict) else {}
            self._scalars = {str(k): float(v) for k, v in top.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}
            # Entries holding a class ckptavg did not import (or nested past reason) are not
            # written back: they could not be faithfully.
            self._extras = {k: top[k] for k in CARRIED
                            if k in top and not scan(top[k]) & {"opaque", "deep"}}
            self.dropped_extras = tuple(k for k in CARRIED if k in top and k not in self._extras)
            # Entries besides the weights and our metadata (optimizer, loops, configs).
            self.other_entries = tuple(str(k) for k, v in top.items()
                                       if v is not state and k != "metadata")
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
                value = _ref_number(fd, path, count) if isinstance(count, TensorRef) \
                    else count.item()
                self._meta.setdefault("swa.n_averaged", str(int(value)))
            self._names, removed = strip_keys(list(self._tensors), strip_prefix, path)
            self.removed_prefixes = tuple(removed)
            self._ties = find_ties({public: self._tensors[raw] for public, raw in self._names.items()})
            if any(isinstance(t, TensorRef) for t in self._tensors.values()):
                self._refs = dict(self._tensors)
                self._fd = fd  # read_structure ran only with a descriptor to keep
                self._tensors = {}  # loaded by torch if a caller asks for one (read)
            else:
                self._find_map(fd, src)
        finally:
            if self._fd is None:
                os.close(fd)

    def _find_map(self, fd: int, src: SourceFile) -> None:
        """Where torch's map of the file lies, so that tensors can be located in the file."""
        self._lowest = _lowest_storage(self._tensors)
        self._base = _map_start(self._lowest, fd, src) if self._mmap and self._lowest else None
        if self._base is not None and keep_descriptor(fd):
            self._fd = fd  # tensors are then read with pread (see locate)

    def _loaded(self) -> object:
        """The object torch loads from a file described without torch (loaded once, mapped)."""
        if self._torch_object is None:
            self._torch_object = torch_load(self.path, self._fd, mmap=True)
        return self._torch_object

    def _tensor(self, raw: str) -> torch.Tensor:
        """A tensor itself: a file described without torch is loaded by torch now."""
        if self._refs and not self._tensors:
            state, _ = find_state_dict(self._loaded(), self._key, self.path)
            tensors = {k: state.get(k) for k in self._refs}
            if not all(_is_tensor(t) and tuple(t.shape) == self._refs[k].shape
                       and t.dtype == self._refs[k].dtype for k, t in tensors.items()):
                raise CheckpointError(f"{self.path}: changed while it was being read; run again")
            self._tensors = tensors
            self._lowest = _lowest_storage(tensors)
        return self._tensors[raw]

    def ties(self) -> dict[str, str]:
        return dict(self._ties)

    def info(self, key: str) -> TensorSpec:
        raw = self._raw(key)
        t = self._refs[raw] if self._refs else self._tensors[raw]
        return TensorSpec(key, tuple(t.shape), t.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._tensor(self._raw(key))

    def locate(self, key: str) -> Extent | None:
        raw = self._raw(key)
        if self._refs:
            ref = self._refs[raw]
            if not ref.numel() or not ref.is_contiguous():
                return None
            return Extent(self._fd, ref.file_offset(), self.path)
        t = self._tensors[raw]
        if self._fd is None or not t.numel() or not t.is_contiguous():
            return None
        return Extent(self._fd, t.data_ptr() - self._base, self.path)

    def release(self, key: str) -> None:
        if self._mmap and self._tensors:
            storage = self._tensors[self._raw(key)].untyped_storage()
            drop_pages(storage.data_ptr(), storage.nbytes())

    def release_range(self, key: str, start: int, nbytes: int) -> None:
        if self._mmap and self._tensors:
            t = self._tensors[self._raw(key)]
            # `start` may be negative: pages of the file before this tensor, never before the
            # file's first storage (all storages are views of one map of the file).
            lo = max(t.data_ptr() + start, self._lowest)
            drop_pages(lo, t.data_ptr() + start + nbytes - lo)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def position(self) -> Position:
        return self._position.merged(super().position())

    def extras(self) -> dict[str, object]:
        if self._refs and "ref" in scan(self._extras):  # tensors among them: torch's objects
            return {k: self._loaded()[k] for k in self._extras}
        return dict(self._extras)

    def scalars(self) -> dict[str, float]:
        return dict(self._scalars)

    def close(self) -> None:
        self._tensors = {}
        self._refs = {}
        self._torch_object = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lowest_storage(tensors: dict) -> int:
    """The lowest address of the (mapped) storages of `tensors`; 0 when all are empty."""
    return min((t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()),
               default=0)


def _map_start(ptr: int, fd: int, src: SourceFile) -> int | None:
    """The address at which byte 0 of the file would lie in the map torch made of it, so that
    a tensor's file offset is its address minus this; None where it cannot be established
    (not Linux, or the file's storages were byte-swapped on load: their bytes in the file are
    not the tensor's).

    Found from /proc/self/maps: the mapping that holds `ptr` (a storage of the file), checked
    to be of this file's inode."""
    if not _native_order(fd, src.path):
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


def _native_order(fd: int, path: str) -> bool:
    """Whether the zip's `byteorder` record, if any, is this machine's (torch swaps the
    bytes of a foreign-order file on load, in memory only). Read through the open `fd`."""
    try:
        with open(fd_path(fd, path), "rb") as f, zipfile.ZipFile(f) as z:
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
