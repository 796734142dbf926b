"""Each input's content hash, taken in the averaging read pass: no second read.

The hash is of what an input holds, not of its container: for every tensor, in the order of
the names, its name, dtype and shape and the CRC-32 of its bytes, all hashed with xxh3-128.
A `.pt` and a `.safetensors` of the same weights hash alike, and so do two files that differ
only in metadata or optimizer state. A tensor a torch writer skips as tied to another counts
with that tensor's digest (the inputs agree on the tie, so its bytes are the same).

Chosen by measurement on this project's 2-core VM (docs/performance.md). The bytes are
summed by the reader thread as they arrive, with isal's CRC-32 (22 GB/s here, and it
releases the GIL); a tensor that is a whole torch zip record takes the record's CRC-32,
which the reader checks anyway, so a torch input's bytes are summed once. xxh3-128 over the
bytes is as fast but holds the GIL, which held up the arithmetic threads (the pass 18 %
slower on 12 inputs); BLAKE3 (4.5 GB/s), zlib's CRC-32 (4.1) and SHA-256 (1.8) cost more.
A CRC-32 per tensor tells apart contents that differ by accident or edit (a change goes
unseen with odds of 2**-32 per tensor it touches); it is no defence against a forger who
crafts collisions (`--hash` records each file's SHA-256 for that).

Until the pass is over, an output's metadata holds a placeholder of the digest's length for
each hash (`placeholder(i)`); the writer swaps in the digests before it commits (`fill`).
"""

from __future__ import annotations

import numpy as np
import xxhash
from isal.isal_zlib import crc32

from ckptavg.errors import CkptavgError
from ckptavg.io.writer import PENDING

ALGORITHM = "xxh3-128"
_HEX = 32  # hex digits of a digest


def placeholder(i: int) -> str:
    """The stand-in for input `i`'s digest in metadata: as long as a digest, never one
    (io/writer.PENDING marks it, so that a writer can tell it)."""
    tail = f"{i}~"
    return f"{ALGORITHM}:{PENDING}{'~' * (_HEX - len(PENDING) - len(tail))}{tail}"


class _Summer:
    """One tensor's running CRC-32 over its bytes, in order."""

    __slots__ = ("crc",)

    def __init__(self):
        self.crc = 0

    def update(self, data) -> None:
        self.crc = crc32(memoryview(data).cast("B"), self.crc)

    def digest(self) -> bytes:
        return self.crc.to_bytes(4, "little")


class ContentHashes:
    """The content hashes of `count` inputs over `specs` (TensorSpec, plan order): the
    kernel feeds each input's bytes of each tensor in order (`update`), or the digest of the
    tensor a skipped tie points to (`tie`)."""

    def __init__(self, count: int, specs, dtypes):
        self.specs, self.dtypes = list(specs), dtypes  # dtypes: key -> the inputs' dtype
        self._open: list[dict[str, object]] = [{} for _ in range(count)]
        self._adopted: list[dict[str, int]] = [{} for _ in range(count)]
        self._digests: list[dict[str, bytes]] = [{} for _ in range(count)]

    @classmethod
    def of_plan(cls, plan) -> ContentHashes:
        """The hashes of a plan's inputs, over every tensor they hold (`plan.read_specs`,
        which carry the inputs' own dtypes)."""
        return cls(len(plan.readers), plan.read_specs,
                   {s.key: s.dtype.name for s in plan.read_specs})

    def update(self, i: int, key: str, data) -> None:
        """The next bytes of tensor `key` of input `i` (a buffer or numpy array)."""
        h = self._open[i].get(key)
        if h is None:
            h = self._open[i][key] = _Summer()
        h.update(np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                 if isinstance(data, np.ndarray) else data)

    def adopt(self, i: int, key: str, crc: int) -> None:
        """Tensor `key` of input `i` is a whole torch zip record, whose CRC-32 the reader
        checks anyway (and refuses the file, before any commit, if its bytes do not sum to
        it): that CRC is its digest, and its bytes are not summed a second time."""
        self._adopted[i][key] = crc

    def done(self, i: int, key: str) -> None:
        """Tensor `key` of input `i` is complete (an empty one hashes as no bytes)."""
        h = self._open[i].pop(key, None) or _Summer()
        crc = self._adopted[i].pop(key, None)
        self._digests[i][key] = h.digest() if crc is None else crc.to_bytes(4, "little")

    def tie(self, key: str, target: str) -> None:
        for d in self._digests:
            d[key] = d[target]

    def record(self, keys: list[str]) -> dict[str, dict[str, str]]:
        """The digests of tensors `keys` in each input, for a finished shard's record."""
        return {str(i): {k: d[k].hex() for k in keys if k in d}
                for i, d in enumerate(self._digests)}

    def hexdigests(self, records: dict[str, dict] | None = None) -> list[str] | None:
        """Each input's content hash, `xxh3-128:HEX`, once every tensor is done: here, or in
        a shard an earlier run finished (`records`: shard -> `record`). None when a tensor's
        digest is missing (an earlier run's record holds none)."""
        merged = [dict(d) for d in self._digests]
        for rec in (records or {}).values():
            for i, d in enumerate(merged):
                for k, hexed in (rec.get(str(i)) or {}).items():
                    d.setdefault(k, bytes.fromhex(hexed))
        if any(s.key not in d for d in merged for s in self.specs):
            return None
        return [_combine([(s.key, self.dtypes[s.key], s.shape, d[s.key]) for s in self.specs])
                for d in merged]


def _combine(tensors: list[tuple[str, str, tuple, bytes]]) -> str:
    """The content hash of (name, dtype, shape, digest of its bytes) per tensor, taken in
    the order of the names (so that a container's own order does not count)."""
    h = xxhash.xxh3_128()
    for key, dtype, shape, digest in sorted(tensors):
        h.update(f"{key}\0{dtype}\0{','.join(map(str, shape))}\0".encode())
        h.update(digest)
    return f"{ALGORITHM}:{h.hexdigest()}"


READ = 8 << 20


def hash_reader(reader) -> str:
    """The content hash of one input, read for it alone: what the read pass computes, for
    an input whose recorded identity no longer matches (`average --into`)."""
    from ckptavg.io.files import pread_extent
    from ckptavg.io.writer import as_array

    tensors = []
    for key in reader.keys():
        info = reader.info(key)
        h = _Summer()
        ext = reader.locate(key) if info.numel else None
        if ext is not None:
            buf = np.empty(min(READ, info.nbytes), np.uint8)
            for lo in range(0, info.nbytes, READ):
                view = memoryview(buf[:min(READ, info.nbytes - lo)])
                pread_extent(ext, view, lo)
                h.update(view)
        elif info.numel:
            h.update(as_array(reader.read(key)))
        reader.release(key)
        tensors.append((key, info.dtype.name, tuple(info.shape), h.digest()))
    return _combine(tensors)


def refuse_same_tensors(paths: list[str], digests: list[str],
                        positions: list[tuple] | None = None) -> None:
    """Two inputs that hold the same tensors (a `final.pt` saved from the last epoch's
    weights, the same weights in another container) would count one checkpoint twice:
    refused, before the output is committed, naming both. Two snapshots saved at different
    known positions (epoch, step) stay distinct even when their weights are equal (a run
    whose weights did not move between them)."""
    seen: dict[str, tuple[str, tuple]] = {}
    for i, (path, d) in enumerate(zip(paths, digests)):
        pos = positions[i] if positions else (None, None)
        if d in seen:
            other, before = seen[d]
            known = pos != (None, None) and before != (None, None)
            if not known or pos == before:
                raise CkptavgError(
                    f"{path}: holds the same tensors as {other} (one checkpoint saved twice, "
                    "in another container or under another name), so it would be counted "
                    "twice; nothing was written: pass one of them")
        seen.setdefault(d, (path, pos))
