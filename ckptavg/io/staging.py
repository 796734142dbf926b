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
import fcntl
import hashlib
import json
import os
import shutil

from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io.atomic import fsync_dir, write_error

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
    inputs = [{"file": os.path.basename(r.path.rstrip(os.sep)), "fingerprint": r.fingerprint()}
              for r in readers]
    return {"version": VERSION, "inputs": inputs,
            "averaging": {k: v for k, v in metadata.items() if k in OPTION_OF},
            "specs": {s.key: [list(s.shape), s.dtype.name] for s in specs}}


def claim(path: str, output: str) -> int:
    """Lock the staging folder `path` (made if missing) for this run: a second run writing
    the same output at the same time is refused instead of sharing it. The parent folder is
    locked for the moment of the claim, so two runs cannot both make and lock it. Returns
    the descriptor that holds the lock (close it to release)."""
    parent = os.path.dirname(path)
    pfd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(pfd, fcntl.LOCK_EX)
        os.makedirs(path, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CkptavgError(f"{output}: another run is writing it now (its staging folder "
                               f"{path} is locked); wait for it to finish") from None
        return fd
    finally:
        os.close(pfd)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Staging:
    """The staging folder of one folder output: made fresh, or (resume) checked and kept."""

    _lock: int | None = None

    def __init__(self, output: str, want: dict, resume: bool):
        self.output = os.path.abspath(output.rstrip(os.sep))
        self.path = staging_path(self.output)
        self.notes: list[str] = []
        self.done: set[str] = set()
        parent = os.path.dirname(self.output)
        if not os.path.isdir(parent):
            raise CkptavgError(f"{self.output}: folder {parent} does not exist; create it first")
        try:
            self._lock = claim(self.path, self.output)
        except OSError as e:
            raise write_error(self.output, e) from None
        found = _read_json(os.path.join(self.path, PLAN))
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
        if found is not None and any(n.endswith(DONE) for n in os.listdir(self.path)):
            self.notes.append(f"{self.path}: an interrupted run's finished shards were "
                              "discarded (average --resume would have continued them)")
        elif resume:
            self.notes.append(f"nothing to resume for {self.output} (no {self.path}); "
                              "averaged from the start")
        try:
            _empty(self.path)  # ours by its name and lock: whatever a killed run left
            _write_json(os.path.join(self.path, PLAN), want)
        except OSError as e:
            self.release()
            raise write_error(self.output, e) from None

    def _verified(self, want: dict) -> set[str]:
        """The shards whose file matches its `.done` record (size and sha256); the others
        (and any stray temporary file) are removed and made again."""
        done = set()
        for name in want["shards"]:
            rec = _read_json(os.path.join(self.path, name + DONE))
            shard = os.path.join(self.path, name)
            if rec is None or not os.path.isfile(shard):
                continue
            if os.path.getsize(shard) == rec.get("bytes") and sha256_file(shard) == rec.get("sha256"):
                done.add(name)
            else:
                self.notes.append(f"{shard}: does not match its record (damaged since); made again")
                for p in (shard, shard + DONE):
                    with contextlib.suppress(OSError):
                        os.unlink(p)
        return done

    def _sweep(self) -> None:
        """Remove what a killed run left half-written (temporary files, unrecorded shards)."""
        keep = {PLAN} | self.done | {n + DONE for n in self.done}
        for name in os.listdir(self.path):
            if name not in keep:
                p = os.path.join(self.path, name)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(p)

    def finished(self, name: str) -> None:
        record_done(self.path, name)

    def settle(self) -> None:
        """Before the folder is committed: the bookkeeping goes, only the output stays."""
        for name in os.listdir(self.path):
            if name == PLAN or name.endswith(DONE):
                os.unlink(os.path.join(self.path, name))

    def keep_or_drop(self) -> str | None:
        """After a failure: keep the folder when a shard is done (returns a line saying how
        to finish), else remove it (nothing worth keeping)."""
        done = [n for n in os.listdir(self.path) if n.endswith(DONE)] \
            if os.path.isdir(self.path) else []
        self.release()
        if not done:
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        return (f"{len(done)} finished shard(s) are kept in {self.path}: the same command with "
                "--resume finishes the output")

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def with_kept(e: CkptavgError, kept: str | None) -> CkptavgError:
    """The error a failed run raises: `e`, with the line saying how to finish the output
    when finished shards were kept (same exit code)."""
    if not kept:
        return e
    again = CkptavgError(f"{e}; {kept}")
    again.exit_code = e.exit_code
    return again


def record_done(path: str, name: str) -> None:
    """Record shard `name` of the staging folder `path` as done (its size and sha256), once
    its file is complete and renamed into place."""
    shard = os.path.join(path, name)
    _write_json(shard + DONE, {"bytes": os.path.getsize(shard), "sha256": sha256_file(shard)})


def _empty(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)



def refuse_changes(found: dict, want: dict, where: str) -> None:
    """One line naming what differs between the interrupted run and this one."""
    hint = (f"; run it as before, or without --resume to start over (this discards {where})")
    if found.get("version") != VERSION:
        raise CkptavgError(f"{where}: written by another version of ckptavg{hint}")
    old = {e["file"]: e["fingerprint"] for e in found["inputs"]}
    new = {e["file"]: e["fingerprint"] for e in want["inputs"]}
    if list(old) != list(new):
        gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        what = ", ".join([f"{f} is no longer an input" for f in gone[:2]]
                         + [f"{f} is a new input" for f in added[:2]]) or "their order changed"
        raise OptionError("inputs", f"not the inputs of the interrupted run: {what}{hint}")
    changed = [f for f in new if old[f] != new[f]]
    if changed:
        raise CkptavgError(f"{changed[0]}: changed since the interrupted run began (its size or "
                           f"modification time differs); its shards would not match{hint}")
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
