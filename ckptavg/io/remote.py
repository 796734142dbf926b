"""Checkpoints in object storage (s3://, gs://, hf://, any fsspec URL), read in place.

Inputs are every format ckptavg reads: a `RemoteFile` answers the calls of a local open file
(base.OpenFile) and a `RemoteFolder` those of a local folder (base.Folder), so safetensors
files and folders, torch files, Hugging Face .bin folders and DCP folders are read by their
own readers. A format's header or zip directory is read with a few ranged GETs, then the
engine reads each tensor's byte spans as it needs them, through a read-ahead window per
object whose next window is fetched in the background (several GETs in flight across the
inputs). Windows are 8 MiB, smaller when many objects are read at once; every byte a window
holds or has in flight is counted against one budget of 128 MiB, and a read-ahead that
would pass it is not made (the bytes a read asks for are fetched then, and no more), so
however many objects are open, their windows hold at most 128 MiB beyond the read in
progress; nothing is downloaded whole. A failed GET (a dropped connection, a
timeout) is retried with backoff, then is one line naming the object and the bytes. An
object rewritten while it is read (another ETag or size) refuses the result, as a local file
rewritten in place does.

Outputs (`-o s3://...`) are streamed as multipart uploads (`Upload`), which the store shows
only once complete; a folder output's shards each so, its index last. No local space is used.

fsspec and the scheme's package (s3fs, gcsfs, huggingface_hub) are the `remote` extra;
credentials come from their standard environment and configuration files, and no URL
query, key or token is ever written into metadata (only the object's base name is).
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptavg.errors import CheckpointError, CkptavgError, OutputError
from ckptavg.io.atomic import Atomic
from ckptavg.io.files import Extent, SourceFile, number_at
from ckptavg.io.folders import INDEX_NAME, Folder

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RETRIES = 4  # tries of one ranged GET before the run stops
BACKOFF = 0.2  # seconds before the second try, doubling
WINDOW = 8 << 20  # bytes fetched per ranged GET when reading ahead, at most
GAP = 1 << 20  # spans of one get_many this close share a GET (bytes between them fetched too)
BUDGET = 128 << 20  # bytes all objects' windows hold or have in flight, beyond a read's own
MIN_WINDOW = 64 << 10  # a read-ahead smaller than this is not worth a GET: none is made
_LIVE = [0]  # objects with a read-ahead window right now
_HELD = [0]  # bytes counted against BUDGET now
_PEAK = [0]  # the most ever counted (what the budget test measures)
_BUDGET_LOCK = threading.Lock()


def window_size() -> int:
    """Each object's window: WINDOW, smaller when many are read at once, so that their
    windows (the current one and the next) share BUDGET; MIN_WINDOW at least."""
    return max(MIN_WINDOW, min(WINDOW, BUDGET // (2 * max(_LIVE[0], 1))))


def _take(k: int) -> int:
    """Up to `k` bytes of the budget for a read-ahead: what is left, or 0 below MIN_WINDOW."""
    with _BUDGET_LOCK:
        k = min(k, BUDGET - _HELD[0])
        if k < MIN_WINDOW:
            return 0
        _HELD[0] += k
        _PEAK[0] = max(_PEAK[0], _HELD[0])
        return k


def _give(k: int) -> None:
    with _BUDGET_LOCK:
        _HELD[0] -= k


def _settle_next(nxt: tuple) -> None:
    """A read-ahead not taken: cancelled (or, on its way, dropped), its bytes given back."""
    nxt[1].cancel()
    _give(nxt[2])


_POOL = ThreadPoolExecutor(8, thread_name_prefix="ckptavg-get")

EDGE = 256 << 10  # bytes fetched at once from either end of an object (RemoteFile._edge)
EDGES = 32  # object ends kept (8 MiB at most), shared by all objects
_EDGES: dict[tuple, bytes] = {}
_EDGE_LOCK = threading.Lock()


def is_remote(path) -> bool:
    """Whether `path` is a URL of remote storage (`file://` is local)."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith("file://")


def local_path(path):
    """A `file://` URL as the local path it names (percent-escapes decoded); any other path
    or URL as it is. A local file has one identity whatever its spelling: `file:///r/a.pt`,
    `/r/a.pt`, `/r/x/../a.pt` and a link to it are compared by (device, inode)."""
    if isinstance(path, str) and path.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(path)
        if parts.netloc not in ("", "localhost"):
            raise CkptavgError(f"{path}: a file URL of another host; pass a local path")
        return unquote(parts.path) or "/"
    return path


def canonical(url: str) -> str:
    """One spelling of a remote location, for comparing locations: the store's first
    protocol name (`s3a://` and `s3n://` are `s3://`, as fsspec maps them), the key without
    `.` or `..` segments, repeated or trailing slashes."""
    fs, key = filesystem(url)
    return _canonical(fs, key)


def _canonical(fs, key: str) -> str:
    key = posixpath.normpath("/" + key.replace("\\", "/")).lstrip("/")
    return _url(fs, key)


def filesystem(url: str):
    """(fsspec filesystem, path in it) of `url`, or one line saying what to install."""
    try:
        import fsspec
    except ImportError:
        raise CkptavgError(f"{url}: reading object storage needs fsspec and the scheme's "
                           "package: pip install 'ckptavg[remote]' (s3fs), or gcsfs for gs://"
                           ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise CkptavgError(f"{url}: {e}; install the package for this scheme (s3fs for s3://, "
                           "gcsfs for gs://, huggingface_hub for hf://)") from None


def _url(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.lstrip('/')}"


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) < 200 else text[:197] + "..."


def expand(pattern: str) -> list[str]:
    """The objects and folders a remote pattern names (globbed remotely), sorted; a pattern
    ending in '/' names folders."""
    fs, path = filesystem(pattern)
    try:
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path.rstrip("/")))
        else:
            found = [path.rstrip("/")] if fs.exists(path.rstrip("/")) else []
    except Exception as e:  # the store's own errors (credentials, network) have no base class
        raise CkptavgError(f"{pattern}: cannot list it ({_short(e)}); check the URL and the "
                           "credentials") from None
    if not found:
        raise CkptavgError(f"{pattern}: no such object or folder in {_url(fs, '')}; check the "
                           "bucket, the key and the pattern")
    return [_url(fs, p) for p in found]


def _etag(info: dict) -> str | None:
    """An object's version tag as its store names it (S3's ETag, GCS's md5Hash)."""
    return info.get("ETag") or info.get("etag") or info.get("md5Hash")


@dataclass(frozen=True)
class RemoteFile(SourceFile):
    """One object, as it was when opened (size and ETag), read with ranged GETs."""

    fs: object = field(default=None, compare=False, repr=False)
    key: str = ""  # its path in `fs`
    etag: str | None = None
    modified: str = ""  # the store's last-modified time, as it gives it
    _window: dict = field(default_factory=dict, compare=False, repr=False)

    remote = True  # read as base.OpenFile is: get, pread, open, extent, number, close

    def stamp(self) -> dict[str, object]:
        """An object's identity: its version tag (ETag), size and last-modified time."""
        return {"etag": self.etag, "size": self.size, "mtime": self.modified}

    @property
    def identity(self) -> tuple:
        """The object's location in one spelling (`canonical`): `s3a://b/k` is `s3://b/k`."""
        known = getattr(self.fs, "protocol", None) is not None
        return ("remote", _canonical(self.fs, self.key) if known else self.path)

    @classmethod
    def at(cls, url: str, fs=None, key: str | None = None) -> RemoteFile:
        if fs is None:
            fs, key = filesystem(url)
        try:
            info = fs.info(key)
        except FileNotFoundError:
            raise CheckpointError(f"{url}: no such object; check the bucket and the key") from None
        except Exception as e:
            raise CheckpointError(f"{url}: cannot read it ({_short(e)}); check the URL and the "
                                  "credentials") from None
        if info.get("type") == "directory":
            raise CheckpointError(f"{url}: a folder; pass its files, or a folder with "
                                  f"{INDEX_NAME}")
        return cls(url, 0, 0, int(info["size"]), 0, fs=fs, key=key, etag=_etag(info),
                   modified=str(info.get("LastModified") or info.get("mtime") or ""))

    def get(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n): from one of the object's ends when they hold it
        (`_edge`), else with one ranged GET."""
        if n == 0:
            return b""
        edge = self._edge(offset, n)
        if edge is not None:
            start, data = edge
            return data[offset - start:offset - start + n]
        return self._fetch(offset, n)

    def _edge(self, offset: int, n: int) -> tuple[int, bytes] | None:
        """(start, bytes) of the object's first or last EDGE bytes when [offset, offset + n)
        lies within them, fetched with one GET the first time. Opening an input reads
        several small spans there (a safetensors header's length and the header; a zip's
        end records, directory and pickle; the fingerprint's first and last blocks): one
        GET each way instead of one per span. Kept in a small shared cache (EDGES ends, the
        least recently used dropped first) under the object's name, size and ETag; an
        object without an ETag (a store that gives none) is not cached."""
        if self.etag is None or n > EDGE:
            return None
        if offset + n <= EDGE:
            start = 0
        elif offset >= self.size - EDGE:
            start = max(0, self.size - EDGE)
        else:
            return None
        key = (self.path, self.size, self.etag, start)
        with _EDGE_LOCK:
            data = _EDGES.pop(key, None)
            if data is not None:
                _EDGES[key] = data  # most recent last
                return start, data
        data = self._fetch(start, min(EDGE, self.size - start))
        with _EDGE_LOCK:
            _EDGES[key] = data
            while len(_EDGES) > EDGES:
                del _EDGES[next(iter(_EDGES))]
        return start, data

    def _fetch(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n) with one ranged GET, retried; a short answer (the
        object shrank) or a last failure is one line naming the object."""
        error = None
        for attempt in range(RETRIES):
            try:
                data = self.fs.cat_file(self.key, start=offset, end=offset + n)
                if len(data) != n:
                    raise CheckpointError(f"{self.path}: ended at byte {offset + len(data)} "
                                          f"while it was being read ({self.size} when opened); "
                                          "run again once it is complete")
                return data
            except CheckpointError:
                raise
            except FileNotFoundError:
                raise CheckpointError(f"{self.path}: was deleted during the run; nothing was "
                                      "written") from None
            except Exception as e:  # connection resets, timeouts: the store's own types
                error = e
                time.sleep(BACKOFF * 2 ** attempt)
        raise CheckpointError(f"{self.path}: reading bytes {offset}..{offset + n - 1} failed "
                              f"after {RETRIES} tries ({_short(error)}). "
                              "Check the connection and run again")

    def get_many(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """`get` of each (offset, n) (a torch zip's local headers), several GETs in flight;
        spans less than GAP apart share one GET of at most WINDOW bytes, so a file of many
        small records costs a few GETs, not one per record."""
        groups: list[list] = []  # [first byte, end, indices of its spans]: one GET each
        for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
            off, n = spans[i]
            last = groups[-1] if groups else None
            # a span past the end is fetched alone (it fails, as in `get`)
            if last and off + n <= self.size and last[1] <= self.size \
                    and off - last[1] <= GAP and max(last[1], off + n) - last[0] <= WINDOW:
                last[1] = max(last[1], off + n)
                last[2].append(i)
            else:
                groups.append([off, off + n, [i]])
        out: list[bytes] = [b""] * len(spans)
        fetched = _POOL.map(lambda g: self.get(g[0], g[1] - g[0]), groups)
        for (first, _, members), data in zip(groups, fetched):
            for j in members:
                off, n = spans[j]
                out[j] = data[off - first:off - first + n]
        return out

    def pread(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`, through a read-ahead window: what the current window
        holds is copied; past it, the next window (already on its way when the reads go
        forward, also over a small gap such as a zip record's header) takes over and the
        one after it is fetched in the background; anywhere else, one GET from there."""
        n = len(view)
        w = self._window
        if "lock" not in w:
            w["lock"] = threading.Lock()
            _LIVE[0] += 1
        size = window_size()
        with w["lock"]:
            filled = 0
            while filled < n:
                pos = offset + filled
                start, data = w.get("start", -1), w.get("data", b"")
                if not start <= pos < start + len(data):
                    _give(w.pop("counted", 0))  # the window passed: its bytes go back
                    w["data"] = b""
                    nxt = w.pop("next", None)
                    if nxt is not None and nxt[0] <= pos < nxt[0] + nxt[2]:
                        w["counted"] = nxt[2]  # given back when this window passes
                        start, data = nxt[0], nxt[1].result()
                        w["start"], w["data"] = start, data
                        ahead = start + len(data)
                    else:
                        if nxt is not None:
                            _settle_next(nxt)
                        # what the read asks for is fetched into it (the caller's bytes,
                        # never held here); the window starts after it
                        need = min(n - filled, self.size - pos)
                        if need <= 0:
                            raise CheckpointError(f"{self.path}: a read past its end (byte "
                                                  f"{pos} of {self.size}); it is damaged")
                        view[filled:filled + need] = self.get(pos, need)
                        filled += need
                        start, data, ahead = -1, b"", pos + need
                    k = _take(min(size, self.size - ahead)) if ahead < self.size else 0
                    if k:
                        w["next"] = (ahead, _POOL.submit(self.get, ahead, k), k)
                    if not start <= pos < start + len(data):
                        continue
                take = min(n - filled, start + len(data) - pos)
                view[filled:filled + take] = memoryview(data)[pos - start:pos - start + take]
                filled += take

    def open(self) -> io.BufferedReader:
        """A seekable file object over the object (for zipfile: its directory and pickle),
        reading with ranged GETs of 256 KiB blocks, a few kept."""
        return io.BufferedReader(_Ranged(self), 64 << 10)

    def extent(self, offset: int, check: object = None) -> Extent:
        return Extent(-1, offset, self.path, check, source=self)

    def number(self, offset: int, dtype) -> float | None:
        return number_at(self, offset, dtype)

    @contextlib.contextmanager
    def reader(self):
        yield lambda n, offset: self.get(offset, n)

    def changed(self) -> bool:
        try:
            self.fs.invalidate_cache(self.key)  # a listing of its folder may hold it as it was
            info = self.fs.info(self.key)
        except Exception:  # removed, or unreachable now: what was read stays what it was
            return False
        etag = _etag(info)
        return int(info["size"]) != self.size or (etag is not None and etag != self.etag)

    def close(self) -> None:
        _give(self._window.pop("counted", 0))
        nxt = self._window.pop("next", None)
        if nxt is not None:
            _settle_next(nxt)
        self._window.pop("data", None)
        if self._window.pop("lock", None) is not None:
            _LIVE[0] -= 1


BLOCK = 256 << 10  # what one read of a remote file object fetches, aligned
BLOCKS = 4  # blocks such a file object keeps (the zip directory at the end, the pickle)


class _Ranged(io.RawIOBase):
    """A remote object as a read-only raw stream for zipfile: reads are served from
    BLOCK-aligned blocks, each fetched with one ranged GET and the last BLOCKS kept, so the
    small seeks of a zip's end records, central directory and pickle cost a few GETs."""

    def __init__(self, src: RemoteFile):
        self._src, self._pos = src, 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._src.size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _block(self, i: int) -> bytes:
        data = self._blocks.pop(i, None)
        if data is None:
            data = self._src.get(i * BLOCK, min(BLOCK, self._src.size - i * BLOCK))
        self._blocks[i] = data  # newest last
        while len(self._blocks) > BLOCKS:
            del self._blocks[next(iter(self._blocks))]
        return data

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._src.size - self._pos))
        if n > BLOCK * BLOCKS:  # a large read: straight through
            b[:n] = self._src.get(self._pos, n)
        else:
            done = 0
            while done < n:
                i, at = divmod(self._pos + done, BLOCK)
                part = memoryview(self._block(i))[at:at + n - done]
                b[done:done + len(part)] = part
                done += len(part)
        self._pos += n
        return n


class RemoteFolder(Folder):
    """A folder (a key prefix) in remote storage, answering base.Folder's calls."""

    remote = True

    def __init__(self, url: str, fs=None, key: str | None = None):
        if fs is None:
            fs, key = filesystem(url)
        self.path, self.fs, self.key = url.rstrip("/"), fs, key.rstrip("/")
        self._names: list[str] | None = None

    def join(self, name: str) -> str:
        return f"{self.path}/{name}"

    def names(self) -> list[str]:
        if self._names is None:
            try:
                found = self.fs.ls(self.key, detail=True)
            except FileNotFoundError:
                found = []
            except Exception as e:
                raise CheckpointError(f"{self.path}: cannot list it ({_short(e)}); check the "
                                      "URL and the credentials") from None
            self._names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in found
                                 if e.get("type") != "directory")
        return self._names

    def has(self, name: str) -> bool:
        return name in self.names()

    def open(self, name: str) -> tuple[RemoteFile, RemoteFile]:
        f = RemoteFile.at(self.join(name), self.fs, f"{self.key}/{name}")
        return f, f

    def side_file(self, name: str, limit: int) -> bytes | None:
        if not self.has(name):
            return None
        try:
            return self.read(name, limit)
        except CheckpointError:
            return None


def locate(url: str) -> RemoteFile | RemoteFolder:
    """The object or the folder (key prefix) `url` names; one line when it is neither."""
    fs, key = filesystem(url)
    try:
        folder = fs.isdir(key.rstrip("/"))
    except Exception as e:
        raise CheckpointError(f"{url}: cannot read it ({_short(e)}); check the URL and the "
                              "credentials") from None
    return RemoteFolder(url, fs, key) if folder else RemoteFile.at(url, fs, key)


def parent(f: RemoteFile) -> RemoteFolder:
    """The folder an object lies in (where a trainer_state.json beside it would be)."""
    return RemoteFolder(f.path.rsplit("/", 1)[0], f.fs, f.key.rsplit("/", 1)[0])


PART = 8 << 20  # bytes per part of an upload, at least (S3: 5 MiB to 5 GiB, 10,000 parts)
MAX_PARTS = 9_000  # parts per object, at most (below S3's 10,000)


def _upload_failed(url: str, e: BaseException) -> OutputError:
    return OutputError(f"{url}: the upload failed ({_short(e)}); no object was made there. "
                       "Check the connection and the permissions and run again")


class _UploadStream:
    """The write end of an upload: what the writers call `file`. A large write (a 64 MiB
    slice of a tensor) is handed over a part at a time, so the upload's buffer holds about
    one part, not the slice."""

    def __init__(self, f, url: str, part: int):
        self._f, self._url, self._part = f, url, part

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            for at in range(0, len(view), self._part):
                self._f.write(view[at:at + self._part])
        except Exception as e:  # the store's own error types
            raise _upload_failed(self._url, e) from None
        return len(view)

    def flush(self) -> None:
        return None  # a part is sent when a part's worth is buffered


class Upload(Atomic):
    """A file output in object storage, streamed as a multipart upload while the engine
    writes it; the store shows the object only once `commit` completes the upload.

    `abort` cancels the upload (nothing appears); a killed process leaves an incomplete
    upload, which no reader lists or reads (a bucket lifecycle rule,
    AbortIncompleteMultipartUpload, removes its parts). Parts are 8 MiB (larger for
    outputs past 70 GiB); s3fs and its HTTP client hold a few copies of one, about 20 to 40
    MiB of peak memory more than a local output (measured); no local space is used."""

    def __init__(self, url: str, size: int):
        fs, key = filesystem(url)
        self.path = url
        part = max(PART, -(-size // MAX_PARTS))
        try:  # autocommit off: closing sends the last part, `commit` makes the object
            self._f = fs.open(key, "wb", block_size=part, autocommit=False)
        except Exception as e:
            raise _upload_failed(url, e) from None
        self.file = _UploadStream(self._f, url, part)

    def sent(self, nbytes: int) -> None:
        return None

    def commit(self) -> None:
        try:
            self._f.close()
            self._f.commit()  # S3: completes the multipart upload
        except Exception as e:
            raise _upload_failed(self.path, e) from None

    def close(self) -> None:
        self.commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.discard()  # S3: aborts the multipart upload
        with contextlib.suppress(Exception):
            self._f.closed = True  # its finalizer sends nothing more


def check_output(url: str, kind: str, inputs) -> None:
    """Refuse a remote output that is one of the inputs, or a folder prefix that exists."""
    fs, key = filesystem(url)
    key = key.rstrip("/")
    if ("remote", _canonical(fs, key)) in {f.identity for f in inputs}:
        raise OutputError(f"{url}: is one of the inputs; nothing was written: write the "
                          "output elsewhere")
    try:
        exists = fs.exists(key)
        folder = exists and (kind == "sharded" or fs.isdir(key))
    except Exception as e:
        raise OutputError(f"{url}: cannot reach it ({_short(e)}); check the URL and the "
                          "credentials") from None
    if folder:
        raise OutputError(f"{url}: exists; a remote folder output is a new prefix (remove "
                          "it, or choose another)")


def put(url: str, data: bytes) -> None:
    """A small object (an index, a side file) in one PUT."""
    fs, key = filesystem(url)
    try:
        fs.pipe_file(key, data)
    except Exception as e:
        raise _upload_failed(url, e) from None


def remove(urls: list[str]) -> None:
    """Remove objects this run made (a failed folder output's finished shards)."""
    for url in urls:
        fs, key = filesystem(url)
        with contextlib.suppress(Exception):
            fs.rm_file(key)
