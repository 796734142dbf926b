"""Resuming an interrupted folder output (safetensors shards, or a DCP checkpoint, which is
staged as safetensors shards and saved from them at the end): the shards a killed or failed
run finished stay in a staging folder beside the output, with the run's plan; `average
--resume` checks them and reduces only the missing shards.

The staging folder is `.{name}.ckptavg-partial` beside the output `name`. It holds:

- `plan.json`: what fixes the bytes of every shard: the inputs (file name and fingerprint),
  the averaging (method, weights, accumulation, profile), each shard's name and keys and
  the output dtype of each tensor; written once, before any shard;
- one `NAME.done` per finished shard (its size and sha256), written after the shard file
  was fsynced and renamed into place: a shard without its `.done` is not trusted;
- the finished shards themselves.

A resumed run refuses, naming it, any input or option that would change a shard's bytes.
Each shard's bytes depend only on the plan and its keys, so the result is bitwise that of
an uninterrupted run (tests/test_resume.py). One process or torchrun alike: under torchrun
each rank owns one shard and writes its own `.done`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat

from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io.atomic import write_error
from ckptavg.io.files import stamp_change

PLAN = "plan.json"
DONE = ".done"
VERSION = 1
# average.* metadata entries and the option that sets each (what a refusal names)
OPTION_OF = {"average.method": "weights/ema/profile", "average.weights": "weights",
             "average.accumulate": "accumulate", "average.profile": "profile",
             "average.n": "inputs"}


def staging_path(output: str) -> str:
    output = os.path.abspath(output.rstrip(os.sep))
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.ckptavg-partial")


def describe(readers, specs, metadata: dict[str, str]) -> dict:
    """What plan.json records of a run, less its shards: everything else that fixes the
    bytes of a shard (the inputs, the averaging, each tensor's output shape and dtype)."""
    inputs = [r.entry() for r in readers]
    return {"version": VERSION, "inputs": inputs,
            "averaging": {k: v for k, v in metadata.items() if k in OPTION_OF},
            "specs": {s.key: [list(s.shape), s.dtype.name] for s in specs}}


MARK = ".ckptavg-staging"  # made with the folder, exclusively: what says the folder is ours
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _refuse_foreign(path: str, output: str, why: str) -> CkptavgError:
    return CkptavgError(f"{output}: its staging name {path} {why}; ckptavg touches nothing in "
                        "it: move it away (or remove it if it is yours), then run again")


def _open_ours(path: str, output: str, made: bool) -> int:
    """Open the staging folder without following a link and confirm it is ours: a real
    folder, owned by this user, holding the mark made with it (`made`: this run made it and
    makes the mark now). Returns its descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise _refuse_foreign(path, output, "is a link") from None
        if e.errno == errno.ENOTDIR:
            raise _refuse_foreign(path, output, "is not a folder") from None
        raise
    try:
        st = os.fstat(fd)
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise _refuse_foreign(path, output, "belongs to another user")
        if made:
            os.close(os.open(MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                             0o600, dir_fd=fd))
        else:
            try:
                mark = os.stat(MARK, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise _refuse_foreign(path, output, "was not made by ckptavg") from None
            if not stat.S_ISREG(mark.st_mode):
                raise _refuse_foreign(path, output, "was not made by ckptavg")
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim(path: str, output: str) -> tuple[int, bool]:
    """Lock the staging folder `path` for this run, making it (exclusively, never through a
    link) when missing: a second run writing the same output at the same time is refused
    instead of sharing it. The parent folder is locked for the moment of the claim, so two
    runs cannot both make and lock it. A staging name that is a link, not a folder, or a
    folder ckptavg did not make, is refused and left as it is. Returns (the descriptor that
    holds the lock: close it to release; whether this run made the folder)."""
    parent = os.path.dirname(path)
    pfd = os.open(parent, os.O_RDONLY | _CLOEXEC)
    try:
        fcntl.flock(pfd, fcntl.LOCK_EX)
        try:
            os.mkdir(path, 0o700)
            made = True
        except FileExistsError:
            made = False
        fd = _open_ours(path, output, made)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CkptavgError(f"{output}: another run is writing it now (its staging folder "
                               f"{path} is locked); wait for it to finish") from None
        return fd, made
    finally:
        os.close(pfd)


def _write_json(dfd: int, name: str, obj) -> None:
    """`name` in the folder open as `dfd`, written to a temporary name made exclusively
    (never through a link), fsynced and renamed; the temporary name goes on any failure."""
    tmp = name + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dfd)  # a killed run's: in our own folder
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600,
                 dir_fd=dfd)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dfd)


def _read_json(dfd: int, name: str):
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read(MAX_RECORD + 1))  # a longer one does not parse
    except (OSError, ValueError, RecursionError):
        return None


MAX_RECORD = 64 << 20  # a plan.json or .done record larger than this is damaged


class Staging:
    """The staging folder of one folder output: made fresh, or (resume) checked and kept.
    Everything inside it is reached through the folder's own descriptor (never through a
    link), and only names ckptavg writes there are ever removed."""

    _lock: int | None = None

    def __init__(self, output: str, want: dict, resume: bool):
        self.output = os.path.abspath(output.rstrip(os.sep))
        self.path = staging_path(self.output)
        self.notes: list[str] = []
        self.done: set[str] = set()
        # shard -> {input index: {tensor: the digest of its bytes}} of the finished shards
        # (engine/content.py): a resumed run's content hashes cover every tensor
        self.content: dict[str, dict] = {}
        self._shards = set(want.get("shards", ()))
        parent = os.path.dirname(self.output)
        if not os.path.isdir(parent):
            raise CkptavgError(f"{self.output}: folder {parent} does not exist; create it first")
        try:
            self._lock, made = claim(self.path, self.output)
            self._ident = _ident(os.fstat(self._lock))
        except OSError as e:
            raise write_error(self.output, e) from None
        found = None if made else _read_json(self._lock, PLAN)
        if not made and resume and found is None and _exists(self._lock, PLAN):
            self.release()
            raise CkptavgError(f"{self.path}: its {PLAN} is damaged (not a plan ckptavg wrote); "
                               "run again without --resume to start over (this discards it)")
        if found is not None and resume:
            try:
                refuse_changes(found, want, self.path)
                self.done = self._verified(want)
                self._sweep()
            except BaseException:
                self.release()
                raise
            self.notes.append(f"resumed from {self.path}: {len(self.done)} of "
                              f"{len(want['shards'])} shard(s) already done, checked")
            return
        if found is not None and any(n.endswith(DONE) for n in os.listdir(self._lock)):
            self.notes.append(f"{self.path}: an interrupted run's finished shards were "
                              "discarded (average --resume would have continued them)")
        elif resume:
            self.notes.append(f"nothing to resume for {self.output} (no {self.path}); "
                              "averaged from the start")
        try:
            self._empty()  # ours by its mark and lock: whatever a killed run left
            _write_json(self._lock, PLAN, want)
        except BaseException as e:
            self.keep_or_drop()
            if isinstance(e, OSError):
                raise write_error(self.output, e) from None
            raise

    def _verified(self, want: dict) -> set[str]:
        """The shards whose file matches its `.done` record (size and sha256); the others
        (and any stray temporary file) are removed and made again."""
        done = set()
        for name in want["shards"]:
            rec = _read_json(self._lock, name + DONE)
            if not isinstance(rec, dict):
                continue
            digest = _sha256_at(self._lock, name)
            if digest is None:
                continue
            if digest == (rec.get("bytes"), rec.get("sha256")):
                done.add(name)
                if isinstance(rec.get("content"), dict):
                    self.content[name] = rec["content"]
            else:
                self.notes.append(f"{os.path.join(self.path, name)}: does not match its record "
                                  "(damaged since); made again")
                for p in (name, name + DONE):
                    with contextlib.suppress(OSError):
                        os.unlink(p, dir_fd=self._lock)
        return done

    def _ours(self, name: str) -> bool:
        """Whether `name` is one ckptavg writes in a staging folder (a shard of this plan or
        of another shard count, its record, the plan, a temporary file of ours)."""
        base = name[:-len(DONE)] if name.endswith(DONE) else name
        return (name in (PLAN, PLAN + ".tmp") or base in self._shards
                or (name.startswith(".") and name.endswith(".tmp"))
                or (base.startswith("model-") and base.endswith(".safetensors")))

    def _sweep(self) -> None:
        """Remove what a killed run left half-written (temporary files, unrecorded shards)."""
        keep = {PLAN, MARK} | self.done | {n + DONE for n in self.done}
        for name in os.listdir(self._lock):
            if name not in keep:
                self._remove(name)

    def _empty(self) -> None:
        for name in os.listdir(self._lock):
            if name != MARK:
                self._remove(name)

    def _remove(self, name: str) -> None:
        """Remove `name` from the folder if it is a name ckptavg writes (else leave it, with
        a note): a plain file is unlinked, never followed."""
        try:
            st = os.stat(name, dir_fd=self._lock, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not self._ours(name) or stat.S_ISDIR(st.st_mode):
            raise _refuse_foreign(self.path, self.output, f"holds {name!r}, which ckptavg "
                                  "does not write")
        os.unlink(name, dir_fd=self._lock)

    def finished(self, name: str, content: dict | None = None) -> None:
        record_done(self.path, name, content)

    def confirm(self) -> None:
        """The staging name still is the folder this run claimed (not replaced by a link)."""
        try:
            now = _ident(os.lstat(self.path))
        except OSError:
            now = None
        if now != self._ident:
            raise CkptavgError(f"{self.path}: was replaced during the run; nothing was "
                               "written: run again")

    def settle(self) -> None:
        """Before the folder is committed: the bookkeeping goes, only the output stays."""
        self.confirm()
        for name in os.listdir(self._lock):
            if name in (PLAN, MARK) or name.endswith(DONE):
                os.unlink(name, dir_fd=self._lock)

    def keep_or_drop(self) -> str | None:
        """After a failure: keep the folder when a shard is done (returns a line saying how
        to finish), else remove it (nothing worth keeping). Only the folder this run
        claimed is removed, and only when it holds nothing but names ckptavg writes."""
        if self._lock is None:
            return None
        done = [n for n in os.listdir(self._lock) if n.endswith(DONE)]
        if not done:
            try:
                self._empty()
                self.confirm()
                os.unlink(MARK, dir_fd=self._lock)
                os.rmdir(self.path)
            except (OSError, CkptavgError):
                pass  # left in place: a later run checks it again
        self.release()
        if not done:
            return None
        return (f"{len(done)} finished shard(s) are kept in {self.path}: the same command with "
                "--resume finishes the output")

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _ident(st: os.stat_result) -> tuple[int, int] | None:
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _sha256_at(dfd: int, name: str) -> tuple[int, str] | None:
    """(size, sha256) of the plain file `name` in the folder `dfd` (None: absent, a link)."""
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        h, n = hashlib.sha256(), 0
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def with_kept(e: CkptavgError, kept: str | None) -> CkptavgError:
    """The error a failed run raises: `e`, with the line saying how to finish the output
    when finished shards were kept (same exit code), else that nothing was written (a read
    error's own message does not say it: `eval` and `inspect` write nothing anyway)."""
    if not kept:
        if "nothing was written" not in str(e) and len(e.args) == 1:
            e.args = (f"{e.args[0]}; nothing was written",)
        return e
    again = CkptavgError(f"{e}; {kept}")
    again.exit_code = e.exit_code
    return again


def record_done(path: str, name: str, content: dict | None = None) -> None:
    """Record shard `name` of the staging folder `path` as done (its size and sha256, and
    the digests of its tensors' bytes in each input, for the content hashes), once its file
    is complete and renamed into place."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
    try:
        size, digest = _sha256_at(dfd, name)
        rec = {"bytes": size, "sha256": digest, **({"content": content} if content else {})}
        _write_json(dfd, name + DONE, rec)
    finally:
        os.close(dfd)


def _well_formed(plan: dict) -> bool:
    """Whether a plan read back has every field a resumed run compares, of its type (the
    file is untrusted: it may have been edited or damaged)."""
    def strs(d) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in d.items())

    inputs, specs, shards = plan.get("inputs"), plan.get("specs"), plan.get("shards")
    return (isinstance(inputs, list)
            and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                    and isinstance(e.get("fingerprint"), str)
                    and isinstance(e.get("identity"), list) for e in inputs)
            and strs(plan.get("averaging")) and set(plan["averaging"]) <= set(OPTION_OF)
            and isinstance(specs, dict) and isinstance(shards, dict)
            and all(isinstance(v, list) and all(isinstance(k, str) for k in v)
                    for v in shards.values())
            and plan.get("output", "folder") in ("folder", "dcp")
            and isinstance(plan.get("entry"), (str, type(None))))


def refuse_changes(found: dict, want: dict, where: str) -> None:
    """One line naming what differs between the interrupted run and this one."""
    hint = (f"; run it as before, or without --resume to start over (this discards {where})")
    if not isinstance(found, dict) or found.get("version") != VERSION:
        raise CkptavgError(f"{where}: written by another version of ckptavg{hint}")
    if not _well_formed(found):
        raise CkptavgError(f"{where}: its {PLAN} is damaged (a field is missing or of the wrong "
                           "type); run again without --resume to start over (this discards it)")
    old = {e["file"]: e for e in found["inputs"]}
    new = {e["file"]: e for e in want["inputs"]}
    if list(old) != list(new):
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        what = ", ".join([f"{f} is no longer an input" for f in gone[:2]]
                         + [f"{f} is a new input" for f in added[:2]]) or "their order changed"
        raise OptionError("inputs", f"not the inputs of the interrupted run: {what}{hint}")
    for f in new:
        changed = stamp_change(old[f]["identity"], new[f]["identity"])
        if changed is None and old[f]["fingerprint"] != new[f]["fingerprint"]:
            changed = "contents"
        if changed:
            raise CkptavgError(f"{f}: changed since the interrupted run began (its {changed} "
                               f"differs); its shards would not match{hint}")
    for k in sorted(set(found["averaging"]) | set(want["averaging"])):
        if found["averaging"].get(k) != want["averaging"].get(k):
            raise OptionError(OPTION_OF[k], f"differs from the interrupted run ({k} was "
                              f"{found['averaging'].get(k)!r}, now {want['averaging'].get(k)!r})"
                              f"{hint}")
    kinds = {"dcp": "a DCP checkpoint (--dcp)", "folder": "a folder of safetensors shards"}
    was, now = found.get("output", "folder"), want.get("output", "folder")
    if was != now:
        raise OptionError("dcp", f"the interrupted run wrote {kinds[was]}, this one "
                          f"{kinds[now]}{hint}")
    if found.get("entry") != want.get("entry"):
        raise OptionError("key", f"the DCP entry differs from the interrupted run's "
                          f"({found.get('entry')!r}, now {want.get('entry')!r}){hint}")
    if found["specs"] != want["specs"]:
        raise OptionError("dtype", f"the output dtypes differ from the interrupted run's{hint}")
    if found["shards"] != want["shards"]:
        raise OptionError(("shard_size",), "the shards differ from the interrupted run's (another "
                          f"shard size or number of ranks){hint}")
