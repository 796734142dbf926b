"""What a torch file's pickle may name, and how its non-weight entries are carried.

One policy for every global a checkpoint names, whatever the pickle protocol (GLOBAL or
STACK_GLOBAL), the nesting or the reader (the torch-free structure reader or torch's
loader): a global of the standard library that can run code (os.system, subprocess.Popen,
builtins.eval/getattr, importlib, pickle and copyreg machinery...) refuses the file in one
line naming it; anything else that is not one of torch's tensor records gets an inert
`Opaque` stand-in (a user's config class, argparse.Namespace, numpy scalars, omegaconf,
Lightning's AttributeDict), never imported, never called.

Entries carried into a torch output (Lightning's hyper-parameters, fairseq's cfg/args) are
converted to plain values by `carry`, so every output loads with `weights_only=True`: a
stand-in that holds a dict of fields (a Namespace, a dataclass, AttributeDict) becomes a
dict, a numpy scalar a Python number, a path its string; anything else is left out, with a
note naming it.
"""

from __future__ import annotations

import _compat_pickle
import pathlib
import sys

from ckptavg.errors import CheckpointError

# Standard-library globals that only hold data: they get stand-ins like a user's class.
DATA_GLOBALS = frozenset({
    "argparse.Namespace", "collections.Counter", "collections.defaultdict",
    "collections.deque", "collections.OrderedDict", "datetime.date", "datetime.datetime",
    "datetime.time", "datetime.timedelta", "datetime.timezone", "decimal.Decimal",
    "fractions.Fraction", "uuid.UUID", "pathlib.Path", "pathlib.PosixPath",
    "pathlib.WindowsPath", "pathlib.PurePath", "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath", "builtins.complex", "builtins.bytearray", "builtins.slice",
    "builtins.range", "builtins.set", "builtins.frozenset", "builtins.list", "builtins.dict",
    "builtins.tuple", "builtins.int", "builtins.float", "builtins.str", "builtins.bytes",
    "builtins.bool", "builtins.object",
})
# Every other standard-library global is code a file could run: refused by name.
STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy",
    "pickle", "copyreg", "copy_reg", "_pickle", "marshal", "types", "functools", "operator",
    "codecs", "_codecs", "io", "shutil", "socket", "ctypes", "pty", "code", "webbrowser"}
NUMPY_SCALARS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
NUMPY_DTYPE = "numpy.dtype"


class RefusedGlobal(CheckpointError):
    """A file names a global that could run code."""


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global as a protocol 0-2 pickle may spell it (Python 2's
    `__builtin__`, `commands.Popen`...), as the unpickler would map it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def refuse_global(path: str, module: str, name: str) -> None:
    """Raise the one-line refusal for a global that would run code; return for any other."""
    module, name = python3_name(module, name)
    if f"{module}.{name}" in DATA_GLOBALS or module.split(".")[0] not in STDLIB:
        return
    raise RefusedGlobal(
        f"{path}: refused to unpickle the global {module}.{name} (code named by a file is "
        "never run); re-save the weights with torch.save(model.state_dict()) or as "
        "safetensors")


def globals_named(data: bytes, limit: int = 64 << 20) -> list[tuple[str, str]]:
    """The globals a pickle stream names, by GLOBAL or protocol 4's STACK_GLOBAL (whose two
    strings may come from the memo), read with pickletools without running anything; the
    stream may hold several pickles one after the other (a legacy torch file)."""
    import io
    import pickletools

    found: list[tuple[str, str]] = []
    data = data[:limit]
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[object] = []
        memo: dict[int, object] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    module, _, name = arg.partition(" ")
                    found.append((module, name))
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(int(arg)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    module, name = strings[-2], strings[-1]
                    if isinstance(module, str) and isinstance(name, str):
                        found.append((module, name))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = None
                if len(found) > 10_000:
                    return found
        except (ValueError, EOFError):  # the stream ends, or is not a pickle past here
            break
    return found


def first_refused(data: bytes) -> str | None:
    """The first global of a pickle stream that `refuse_global` refuses, by its Python 3
    name (None: it names none)."""
    for module, name in globals_named(data):
        try:
            refuse_global("", module, name)
        except RefusedGlobal:
            return ".".join(python3_name(module, name))
    return None


class Opaque(dict):
    """Stands in for an object of a class the file names but ckptavg never imports (a
    user's config class in a Lightning checkpoint's hyper-parameters). Holds what the
    pickle gave it (constructor arguments, items, state); nothing of the class runs."""

    global_name = "?"
    args: tuple = ()
    state: object = None

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}, not imported>"


def stand_in(module: str, name: str) -> type:
    return type(name, (Opaque,), {"global_name": f"{module}.{name}", "__module__": __name__})


MAX_DEPTH = 100  # containers inside containers, in an entry carried into a torch output
# What one non-weight entry may expand to, counting a shared reference each time it is
# reached (as a JSON encoder, a YAML dumper or a deep copy would walk it): a few MB, well
# under a second. A 2 KB pickle can name 2**40 paths through shared tuples.
MAX_NODES = 200_000
MAX_SECONDS = 1.0
MAX_INT_BITS = 2040  # the largest integer a torch output's pickle holds (torchzip)


class _Over(Exception):
    pass


def within_budget(value: object, limit: int = MAX_NODES, cycles: bool = False) -> str | None:
    """None when `value` expands to at most `limit` nodes (a string counts one per 64
    characters), nests at most MAX_DEPTH deep and holds no cycle or integer past
    MAX_INT_BITS; else what it breaks, in words. Linear in the distinct objects it holds:
    each container is walked once and its expanded size remembered, so shared references
    cost nothing to count, and the walk stops at the limit or after MAX_SECONDS. With
    `cycles`, a reference back to a container being walked counts one (pickle keeps it)."""
    import time

    sizes: dict[int, int] = {}
    active: set[int] = set()
    deadline = time.monotonic() + MAX_SECONDS
    steps = [0]

    def size(x: object, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _Over(f"nested more than {MAX_DEPTH} deep")
        kind = type(x)
        if kind in (str, bytes, bytearray):
            return 1 + len(x) // 64
        if kind is int and x.bit_length() > MAX_INT_BITS:
            raise _Over(f"holds an integer of {x.bit_length()} bits")
        # a dict's keys, then its values (never its item pairs: fresh tuples whose ids
        # are reused once freed, which would alias the sizes remembered by id)
        items = (*x.keys(), *x.values()) if isinstance(x, dict) else x if isinstance(
            x, (list, tuple, set, frozenset)) else None
        if items is None:
            state = getattr(x, "state", None) if isinstance(x, Opaque) else None
            if state is not None:
                return 1 + size(state, depth + 1) + size(x.args, depth + 1)
            return 1
        i = id(x)
        if i in sizes:
            return sizes[i]
        if i in active:
            if cycles:
                return 1
            raise _Over("holds itself (a cycle)")
        active.add(i)
        n = 1
        for item in items:
            n += size(item, depth + 1)
            if n > limit:
                raise _Over(f"expands to more than {limit:,} objects (shared references "
                            "counted each time they are reached)")
            steps[0] += 1
            if steps[0] % 4096 == 0 and time.monotonic() > deadline:
                raise _Over(f"takes more than {MAX_SECONDS:g} s to walk")
        active.discard(i)
        sizes[i] = n
        return n

    try:
        size(value, 0)
    except _Over as e:
        return str(e)
    except RecursionError:
        return f"nested more than {MAX_DEPTH} deep"
    return None


class _LeftOut(Exception):
    pass


def carry(value: object, keep: tuple[type, ...] = ()) -> tuple[object, list[str]]:
    """`value` as plain containers and numbers (and the `keep` types, tensors, as they are),
    with notes on what was converted and what was left out. Shared and cyclic containers
    stay shared. Raises nothing: an entry past the budget (`within_budget`: its expanded
    size, depth, integers, time) is left out whole."""
    over = within_budget(value, cycles=True)
    if over is not None:
        return _LEFT_OUT, [f"{over} (left out)"]
    notes: dict[str, None] = {}
    memo: dict[int, object] = {}

    def conv(x: object, depth: int) -> object:
        if x is None or type(x) in (bool, int, float, str, bytes) or isinstance(x, keep):
            return x
        if id(x) in memo:
            return memo[id(x)]
        if depth > MAX_DEPTH:
            raise RecursionError
        if isinstance(x, Opaque):
            return opaque(x, depth)
        if isinstance(x, dict):
            out: dict = {}
            memo[id(x)] = out
            for k, v in x.items():
                put(out, k, v, depth)
            return out
        if isinstance(x, list):
            items: list = []
            memo[id(x)] = items
            items.extend(leaf(v, depth) for v in x)
            return items
        if isinstance(x, tuple):
            memo[id(x)] = out = tuple(leaf(v, depth) for v in x)
            return out
        if isinstance(x, (set, frozenset)):
            return {conv(v, depth + 1) for v in x}
        return real(x, depth)

    def put(out: dict, k: object, v: object, depth: int) -> None:
        try:
            key = conv(k, depth + 1)
            hash(key)
            out[key] = conv(v, depth + 1)
        except _LeftOut as e:
            notes[f"{e} left out"] = None
        except TypeError:
            notes[f"a key of type {type(k).__qualname__} left out"] = None

    def leaf(v: object, depth: int) -> object:
        try:
            return conv(v, depth + 1)
        except _LeftOut as e:
            notes[f"{e} left out (None in its place)"] = None
            return None

    def opaque(x: Opaque, depth: int) -> object:
        g = x.global_name
        if g in NUMPY_SCALARS:
            return numpy_scalar(x)
        if g.startswith("pathlib.") and all(isinstance(a, str) for a in x.args):
            notes[f"{g} carried as a string"] = None
            kind = pathlib.PureWindowsPath if "Windows" in g else pathlib.PurePosixPath
            return str(kind(*x.args))
        if g == "collections.Counter" and x.args and isinstance(x.args[0], dict):
            return conv(x.args[0], depth + 1)
        fields = x.state[0] if isinstance(x.state, tuple) and x.state else x.state
        if not dict.__len__(x) and not isinstance(fields, dict):
            raise _LeftOut(g)
        out: dict = {}
        memo[id(x)] = out
        for source in (dict(x.items()), fields if isinstance(fields, dict) else {}):
            for k, v in source.items():
                put(out, k, v, depth)
        notes[f"{g} carried as a dict"] = None
        return out

    def real(x: object, depth: int) -> object:
        """An object torch's loader built (its allowlist: Namespace, numpy values, paths)."""
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        if kind == "argparse.Namespace":
            notes[f"{kind} carried as a dict"] = None
            return conv(dict(vars(x)), depth + 1)
        if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
            value = x.item()
            if type(value) in (bool, int, float):
                return value
        if kind.startswith("pathlib."):
            notes[f"{kind} carried as a string"] = None
            return str(x)
        raise _LeftOut(kind)

    try:
        return conv(value, 0), list(notes)
    except RecursionError:
        return _LEFT_OUT, [f"nested more than {MAX_DEPTH} deep (left out)"]
    except _LeftOut as e:
        return _LEFT_OUT, [f"{e} left out"]


_LEFT_OUT = object()


def left_out(value: object) -> bool:
    """Whether `carry` left the whole value out."""
    return value is _LEFT_OUT


def numpy_scalar(x: Opaque) -> object:
    """The Python number of a pickled numpy scalar (numpy's `scalar(dtype, bytes)` record),
    decoded from its bytes by numpy without calling anything the file names."""
    import numpy as np

    dt = x.args[0] if len(x.args) == 2 else None
    raw = x.args[1] if len(x.args) == 2 else None
    if not (isinstance(dt, Opaque) and dt.global_name == NUMPY_DTYPE and dt.args
            and isinstance(dt.args[0], str) and isinstance(raw, bytes)):
        raise _LeftOut("numpy scalar")
    code = dt.args[0]
    order = dt.state[1] if isinstance(dt.state, tuple) and len(dt.state) > 1 else "<"
    try:
        kind = np.dtype(code)
    except TypeError:
        raise _LeftOut(f"numpy scalar of dtype {code!r}") from None
    if kind.kind not in "biuf" or len(raw) != kind.itemsize or order not in "<>|=":
        raise _LeftOut(f"numpy scalar of dtype {code!r}")
    if order in "<>":
        kind = kind.newbyteorder(order)
    return np.frombuffer(raw, kind)[0].item()


def number(value: object) -> int | float | None:
    """A number stored beside the weights (an epoch, timm's metric) as Python's, whether
    plain, a numpy scalar torch's loader built or a stand-in for one; None otherwise."""
    if type(value) in (int, float):
        return value
    if isinstance(value, Opaque) and value.global_name in NUMPY_SCALARS:
        try:
            value = numpy_scalar(value)
        except _LeftOut:
            return None
        return value if type(value) in (int, float) else None
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0 \
            and hasattr(value, "item"):
        value = value.item()
        return value if type(value) in (int, float) else None
    return None
