"""Where inputs are: patterns expanded on disk or in object storage, and inputs opened in
the way their place asks for (objects several at a time: each opening is a few round trips).

The engine and the selection name inputs by path or URL and never ask which they are: this
module and `io.remote` decide.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable

from ckptavg.errors import CkptavgError
from ckptavg.io.remote import expand as expand_remote
from ckptavg.io.remote import is_remote, local_path

_NUMBER = re.compile(r"([0-9]+)")
OPENERS = 8  # remote inputs opened at once


def natural_key(path: str) -> list:
    """'epoch-10' sorts after 'epoch-9'."""
    return [(1, int(p)) if _NUMBER.fullmatch(p) else (0, p.lower()) for p in _NUMBER.split(path)]


def expand(patterns: list[str]) -> list[str]:
    """Paths as given (one spelling: `file://` is the local path); patterns with wildcards
    that are not existing paths are globbed, on disk or in the object store, in natural
    name order."""
    out: list[str] = []
    for p in map(local_path, patterns):
        if is_remote(p):
            out.extend(sorted(expand_remote(p), key=natural_key))
        elif not os.path.exists(p) and any(c in p for c in "*?["):
            matches = sorted(glob.glob(p), key=natural_key)
            if not matches:
                raise CkptavgError(f"{p}: the pattern matches no file; check the path")
            out.extend(matches)
        else:
            out.append(p)
    return out


def open_all(paths: list[str], open_one: Callable, opened: list, ready: Callable) -> None:
    """`open_one(path)` for each path, in input order, appended to `opened` (for the
    caller to close, whatever happens); `ready(item)` runs each one's first reads. With
    objects among several inputs they are opened OPENERS at a time (each is a few small
    GETs); the first error in input order is raised once all are done."""
    if not (any(is_remote(p) for p in paths) and len(paths) > 1):
        for p in paths:
            opened.append(open_one(p))
        return
    from concurrent.futures import ThreadPoolExecutor

    def one(p: str):
        item = open_one(p)
        try:
            ready(item)
        except BaseException:
            item.reader.close()
            raise
        return item

    with ThreadPoolExecutor(OPENERS, thread_name_prefix="ckptavg-open") as pool:
        futures = [pool.submit(one, p) for p in paths]
    error = None
    for f in futures:
        try:
            opened.append(f.result())
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
