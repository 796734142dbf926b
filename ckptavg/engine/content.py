"""Each input's content hash, taken in the averaging read pass: no second read.

The hash is of what an input holds, not of its container: for every tensor of the plan, in
plan order, its name, dtype, shape and the xxh3-128 of its bytes, all hashed again with
xxh3-128. A `.pt` and a `.safetensors` of the same weights hash alike, and so do two files
that differ only in metadata or optimizer state. A tensor a torch writer skips as tied to
another counts with that tensor's digest (the inputs agree on the tie, so its bytes are the
same).

xxh3-128 was chosen by measurement on this project's 2-core VM (docs/performance.md): 22 GB/s
against 1.9 GB/s for a memory copy, 4.5 GB/s for BLAKE3, 4.1 GB/s for CRC-32 and 1.8 GB/s for
SHA-256; the averaging loop moves about 1 GB/s, so the hash costs a few percent of it. It
tells apart contents that differ by accident or by edit; it is not a defence against a
forger who crafts collisions (`--hash` records each file's SHA-256 for that).

Until the pass is over, an output's metadata holds a placeholder of the digest's length for
each hash (`placeholder(i)`); the writer swaps in the digests before it commits (`fill`).
"""

from __future__ import annotations

import numpy as np
import xxhash

ALGORITHM = "xxh3-128"
_HEX = 32  # hex digits of a digest
_MARK = "~pending-content~"


def placeholder(i: int) -> str:
    """The stand-in for input `i`'s digest in metadata: as long as a digest, never one."""
    tail = f"{i}~"
    return f"{ALGORITHM}:{_MARK}{'~' * (_HEX - len(_MARK) - len(tail))}{tail}"


class ContentHashes:
    """The content hashes of `count` inputs over `specs` (TensorSpec, plan order): the
    kernel feeds each input's bytes of each tensor in order (`update`), or the digest of the
    tensor a skipped tie points to (`tie`)."""

    def __init__(self, count: int, specs, dtypes):
        self.specs, self.dtypes = list(specs), dtypes  # dtypes: key -> the inputs' dtype
        self._open: list[dict[str, object]] = [{} for _ in range(count)]
        self._digests: list[dict[str, bytes]] = [{} for _ in range(count)]

    def update(self, i: int, key: str, data) -> None:
        """The next bytes of tensor `key` of input `i` (a buffer or numpy array)."""
        h = self._open[i].get(key)
        if h is None:
            h = self._open[i][key] = xxhash.xxh3_128()
        h.update(np.ascontiguousarray(data).view(np.uint8) if isinstance(data, np.ndarray)
                 else data)

    def done(self, i: int, key: str) -> None:
        """Tensor `key` of input `i` is complete (an empty one hashes as no bytes)."""
        h = self._open[i].pop(key, None) or xxhash.xxh3_128()
        self._digests[i][key] = h.digest()

    def tie(self, key: str, target: str) -> None:
        for d in self._digests:
            d[key] = d[target]

    def hexdigests(self) -> list[str]:
        """Each input's content hash, `xxh3-128:HEX`, once every tensor is done."""
        return [_combine([(s.key, self.dtypes[s.key], s.shape, d[s.key]) for s in self.specs])
                for d in self._digests]


def _combine(tensors: list[tuple[str, str, tuple, bytes]]) -> str:
    """The content hash of (name, dtype, shape, digest of its bytes) per tensor, taken in
    the order of the names (so that a container's own order does not count)."""
    h = xxhash.xxh3_128()
    for key, dtype, shape, digest in sorted(tensors):
        h.update(f"{key}\0{dtype}\0{','.join(map(str, shape))}\0".encode())
        h.update(digest)
    return f"{ALGORITHM}:{h.hexdigest()}"


PIECE = 8 << 20


def hash_reader(reader) -> str:
    """The content hash of one input, read for it alone: what the read pass computes, for
    an input whose recorded identity no longer matches (`average --into`)."""
    from ckptavg.io.base import pread_extent
    from ckptavg.io.writer import as_array

    tensors = []
    for key in reader.keys():
        info = reader.info(key)
        h = xxhash.xxh3_128()
        ext = reader.locate(key) if info.numel else None
        if ext is not None:
            buf = np.empty(min(PIECE, info.nbytes), np.uint8)
            for lo in range(0, info.nbytes, PIECE):
                view = memoryview(buf[:min(PIECE, info.nbytes - lo)])
                pread_extent(ext, view, lo)
                h.update(view)
        elif info.numel:
            h.update(as_array(reader.read(key)))
        reader.release(key)
        tensors.append((key, info.dtype.name, tuple(info.shape), h.digest()))
    return _combine(tensors)
