"""torch.save's zip format, written without torch and without holding the model.

A torch file is a zip archive of stored (uncompressed) records: `archive/data.pkl` (a
pickle of the object, whose tensors name storage records), one record per storage
(`archive/data/<key>`, raw little-endian bytes, 64-byte aligned so that `torch.load(mmap=True)`
can map them) and a few small ones. This module writes that layout record by record, the
way torch's own writer (miniz) does: a local header with the sizes left to a data
descriptor after the data, so every storage is written as the engine reduces it and its
CRC-32 is computed on the way; zip64 fields where a size or an offset passes 4 GiB; the zip64
end records always, as torch writes them.

The pickle is emitted opcode by opcode (`Pickle`), protocol 2 as torch.save uses, from plain
values only: None, bool, int, float, str, bytes, list, tuple, dict, set and `TensorRecord`s.
Nothing else can be written, so every output loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ckptavg.io.crc import crc32
from ckptavg.io.dtypes import DType

ALIGN = 64  # torch aligns every record's data to 64 bytes (.storage_alignment)
LIMIT = 0xFFFFFFFF  # past this a size or an offset takes a zip64 field
PREFIX = "archive"  # the archive name torch.save gives a file object

# torch's typed storages: a dtype listed here is pickled as _rebuild_tensor_v2 over
# torch.<Name>Storage (numel in elements); any other as _rebuild_tensor_v3 over an
# UntypedStorage (numel in bytes) with the dtype named, as torch.save does.
LEGACY_STORAGES = {"float64": "DoubleStorage", "float32": "FloatStorage",
                   "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                   "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
                   "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """A dense tensor to pickle: its storage record `key` holds `nbytes` bytes of `dtype`;
    the tensor is `shape` with C-order strides from element `offset`. One object for two
    names keeps them one tensor (ties)."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0

    @property
    def stride(self) -> tuple[int, ...]:
        out, step = [], 1
        for d in reversed(self.shape):
            out.append(step)
            step *= d
        return tuple(reversed(out))


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor among a checkpoint's other entries (not a weight), carried as its bytes."""

    dtype: DType
    shape: tuple[int, ...]
    data: bytes


METADATA_ATTR = "ckptavg_metadata"  # a bare state dict's attribute holding our metadata


@dataclass(frozen=True, eq=False)
class BareState:
    """A bare state dict as torch.save writes one (a `collections.OrderedDict`), with
    ckptavg's metadata set on it as the attribute `ckptavg_metadata` by the pickle's BUILD,
    the way torch sets a state dict's `_metadata`: `load_state_dict(torch.load(f,
    weights_only=True))` and fastai's `load_model` take it as the state dict it is, and
    ckptavg reads the metadata back (io/pt.py)."""

    state: dict
    metadata: dict | None = None


class Unpicklable(TypeError):
    """A value the plain pickle cannot hold (the caller converts or drops it)."""


class Pickle:
    """Protocol-2 pickle opcodes for plain values and TensorRecords, with a memo so that
    shared objects (and containers that hold themselves) stay shared."""

    def __init__(self, blob: Callable[[RawTensor], TensorRecord] | None = None) -> None:
        self.out = bytearray(b"\x80\x02")
        self._blob = blob  # gives a RawTensor a record of its own
        self._memo: dict[int, int] = {}
        self._alive: list[object] = []  # ids stay unique while memoised objects live
        self._building: set[int] = set()

    def dumps(self, obj: object) -> bytes:
        self.dump(obj)
        return bytes(self.out) + b"."

    def _put(self, obj: object) -> None:
        n = len(self._memo)
        self._memo[id(obj)] = n
        self._alive.append(obj)
        self.out += b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)

    def _get(self, obj: object) -> bool:
        n = self._memo.get(id(obj))
        if n is None:
            return False
        self.out += b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)
        return True

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def dump(self, obj: object) -> None:
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif type(obj) is int:
            self._int(obj)
        elif type(obj) is float:
            out += b"G" + struct.pack(">d", obj)
        elif type(obj) is str:
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif self._get(obj):
            return
        elif type(obj) is bytes:  # as torch.save's protocol 2: _codecs.encode(text, latin1)
            self._global("_codecs", "encode")
            self.dump(obj.decode("latin1"))
            self.dump("latin1")
            out += b"\x86R"
            self._put(obj)
        elif type(obj) is list:
            out += b"]"
            self._put(obj)
            self._items(obj, b"e")
        elif type(obj) is dict:
            out += b"}"
            self._put(obj)
            self._items([x for kv in obj.items() for x in kv], b"u", pairs=True)
        elif type(obj) is tuple:
            if id(obj) in self._building:
                raise Unpicklable("a tuple that holds itself")
            self._building.add(id(obj))
            out += b"("
            for x in obj:
                self.dump(x)
            out += b"t"
            self._building.discard(id(obj))
            if not self._get(obj):  # an element may have memoised it meanwhile
                self._put(obj)
        elif type(obj) in (set, frozenset):
            self._global("builtins", "set")
            out += b"("
            self.dump(sorted(obj, key=repr) if _sortable(obj) else list(obj))
            out += b"tR"
            self._put(obj)
        elif isinstance(obj, BareState):
            self._global("collections", "OrderedDict")
            out += b")R"
            self._put(obj)
            self._items([x for kv in obj.state.items() for x in kv], b"u", pairs=True)
            if obj.metadata is not None:
                self.dump({METADATA_ATTR: obj.metadata})
                self.out += b"b"  # BUILD: the OrderedDict's attributes
        elif isinstance(obj, TensorRecord):
            self._tensor(obj)
        elif isinstance(obj, RawTensor) and self._blob is not None:
            record = self._blob(obj)
            self._tensor(record)
            self._memo[id(obj)] = self._memo[id(record)]
            self._alive.append(obj)
        else:
            raise Unpicklable(f"{type(obj).__module__}.{type(obj).__qualname__}")

    def _int(self, x: int) -> None:
        if 0 <= x < 256:
            self.out += b"K" + bytes([x])
        elif 0 <= x < 65536:
            self.out += b"M" + struct.pack("<H", x)
        elif -(1 << 31) <= x < (1 << 31):
            self.out += b"J" + struct.pack("<i", x)
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) >= 256:
                raise Unpicklable("an integer of more than 2040 bits")
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def _items(self, items: list, op: bytes, pairs: bool = False) -> None:
        batch = 2000 if pairs else 1000  # as pickle batches them
        for i in range(0, len(items), batch):
            self.out += b"("
            for x in items[i:i + batch]:
                self.dump(x)
            self.out += op

    def _tensor(self, t: TensorRecord) -> None:
        out = self.out
        legacy = LEGACY_STORAGES.get(t.dtype.name)
        self._global("torch._utils", "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3")
        out += b"(("
        self.dump("storage")
        if legacy:
            self._global("torch", legacy)
        else:
            self._global("torch.storage", "UntypedStorage")
        self.dump(t.key)
        self.dump("cpu")
        self._int(t.nbytes // t.dtype.itemsize if legacy else t.nbytes)
        out += b"tQ"  # persistent id: ('storage', type, key, location, numel)
        self._int(t.offset)
        self.dump(tuple(t.shape))
        self.dump(t.stride)
        out += b"\x89"  # requires_grad
        self._global("collections", "OrderedDict")
        out += b")R"  # backward hooks: an empty OrderedDict
        if not legacy:
            self._global("torch", t.dtype.name)
        out += b"tR"
        self._put(t)


def _sortable(s: set | frozenset) -> bool:
    return all(type(x) in (int, float, str) for x in s)


_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_FLAGS = 0x0808  # sizes in a data descriptor; names in UTF-8 (as torch writes them)


@dataclass
class _Entry:
    name: bytes
    header: int  # offset of the local header
    size: int = 0
    crc: int = 0
    data: int = 0  # offset of its first byte


class ZipStream:
    """Stored records into `out`, one after the other, in torch's layout. `force_zip64`
    writes the zip64 fields of every record (tests use it to reach that code on small
    files)."""

    def __init__(self, out: BinaryIO, force_zip64: bool = False):
        self._out = out
        self.pos = 0
        self._entries: list[_Entry] = []
        self._open: _Entry | None = None
        self._force = force_zip64

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self.pos += len(data)

    def begin(self, name: str, size: int) -> None:
        """Start record `name` of `size` bytes (the size decides its zip64 fields)."""
        e = _Entry(f"{PREFIX}/{name}".encode(), self.pos)
        extra = b""
        if size >= LIMIT or self._force:
            extra = struct.pack("<HHQQ", 1, 16, size, size)
        head = _LOCAL.size + len(e.name) + len(extra) + 4
        pad = -(self.pos + head) % ALIGN
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        self._write(_LOCAL.pack(b"PK\x03\x04", 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(e.name),
                                len(extra)) + e.name + extra)
        e.size = size
        e.data = self.pos
        self._open = e
        self._fed = 0

    def feed(self, data: bytes | memoryview) -> None:
        """The next bytes of the open record."""
        e = self._open
        e.crc = crc32(data, e.crc)
        self._fed += len(data)
        if self._fed > e.size:
            raise RuntimeError(f"{e.name.decode()}: more than its {e.size} bytes")
        self._write(data)

    def end(self) -> None:
        e = self._open
        if self._fed != e.size:
            raise RuntimeError(f"{e.name.decode()}: {self._fed} bytes written, {e.size} expected")
        wide = e.size >= LIMIT or self._force
        self._write(struct.pack("<4sIQQ" if wide else "<4sIII", b"PK\x07\x08", e.crc, e.size,
                                e.size))
        self._entries.append(e)
        self._open = None

    def record(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.feed(data)
        self.end()

    def replace(self, name: str, data: bytes) -> None:
        """Rewrite a finished record in place with `data` of the same length (the output's
        metadata once the pass has computed what it held placeholders for), and its CRC-32
        in the data descriptor and, at `finish`, the central directory. The output must be
        a local file."""
        e = next(e for e in self._entries if e.name == f"{PREFIX}/{name}".encode())
        if len(data) != e.size:
            raise RuntimeError(f"{name}: {len(data)} bytes to replace {e.size}")
        self._out.flush()
        fd = self._out.fileno()
        os.pwrite(fd, data, e.data)
        e.crc = crc32(data)
        os.pwrite(fd, struct.pack("<I", e.crc), e.data + e.size + 4)

    def finish(self) -> None:
        """The central directory and the end records."""
        start = self.pos
        for e in self._entries:
            big, far = e.size >= LIMIT or self._force, e.header >= LIMIT or self._force
            fields = ([e.size, e.size] if big else []) + ([e.header] if far else [])
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields \
                else b""
            self._write(_CENTRAL.pack(
                b"PK\x01\x02", 0, 0, _FLAGS, 0, 0, 0, e.crc, LIMIT if big else e.size,
                LIMIT if big else e.size, len(e.name), len(extra), 0, 0, 0, 0,
                LIMIT if far else e.header) + e.name + extra)
        size, count, end = self.pos - start, len(self._entries), self.pos
        self._write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count,
                                count, size, start))
        self._write(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
        wide = start >= LIMIT or self._force
        self._write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                                min(count, 0xFFFF), min(size, LIMIT),
                                LIMIT if wide else start, 0))


def head_records(stream: ZipStream, pickled: bytes) -> None:
    """data.pkl and the small records torch writes before the storages."""
    stream.record("data.pkl", pickled)
    stream.record(".format_version", b"1")
    stream.record(".storage_alignment", str(ALIGN).encode())
    stream.record("byteorder", sys.byteorder.encode())


def tail_records(stream: ZipStream, pickled: bytes) -> None:
    """The records torch writes after the storages; the serialization id (which torch draws
    at random) is taken from the pickle, so the same average gives the same bytes."""
    stream.record("version", b"3\n")
    digest = int.from_bytes(hashlib.sha256(pickled).digest()[:16], "big")
    stream.record(".data/serialization_id", f"{digest:040d}"[:40].encode())
    stream.finish()
