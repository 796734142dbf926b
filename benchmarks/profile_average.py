"""Where the time of one `ckptavg average` goes: a profile by phase and by thread.

    .venv/bin/python benchmarks/profile_average.py bench-tmp/n6-s512-float32/ck-*.safetensors
    .venv/bin/python benchmarks/profile_average.py --out /tmp/p.safetensors INPUTS...

Runs `ckptavg.average` once in this process (inputs should be in the page cache: run it
twice, or `cat` them first) and reports wall time of the imports, of the run, and the time
spent inside the engine's steps, summed over calls: the arithmetic (widen, fold, divide and
round, finite check) on the calling thread, pread on the reader thread, the file writes and
the final fsync/rename on the writer side. Times on other threads overlap the arithmetic.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import threading
import time

T0 = time.perf_counter()
import numpy  # noqa: E402,F401

T_NUMPY = time.perf_counter()
import ckptavg.engine.average as averaging  # noqa: E402
from ckptavg.engine import arith, kernel  # noqa: E402
from ckptavg.io import writer  # noqa: E402

T_IMPORT = time.perf_counter()

spent: dict[str, float] = collections.defaultdict(float)
calls: dict[str, int] = collections.defaultdict(int)
lock = threading.Lock()


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with lock:
                spent[name] += time.perf_counter() - t
                calls[name] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default="/tmp/ckptavg-profile.safetensors")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    for mod, name, label in ((arith, "widen", "widen (cast to the accumulator)"),
                             (arith, "narrow", "divide's rounding to the output dtype"),
                             (arith, "all_finite", "finite check"),
                             (kernel, "pread_extent", "pread (reader thread)"),
                             (writer.SafetensorsWriter, "_write_part", "file writes (writer thread)"),
                             (writer.AtomicFile, "commit", "fsync + rename"),
                             (averaging, "make_plan", "plan (headers, checks, metadata)"),
                             (averaging, "open_candidates", "open inputs")):
        setattr(mod, name, timed(label, getattr(mod, name)))
    arith_fold = arith.fold
    arith.fold = timed("fold (widen + multiply + add)", arith_fold)
    t = time.perf_counter()
    res = averaging.average(args.inputs, args.out, threads=args.threads)
    run = time.perf_counter() - t
    os.unlink(args.out)
    print(f"python start to numpy imported: {T_NUMPY - T0:.3f} s (interpreter start not "
          "included)")
    print(f"ckptavg imports: {T_IMPORT - T_NUMPY:.3f} s   torch imported: "
          f"{'torch' in sys.modules}")
    print(f"average(): {run:.3f} s for {res.bytes_in / 2**30:.2f} GiB in, "
          f"{res.bytes_out / 2**20:.0f} MiB out, peak RSS {res.peak_rss_bytes / 2**20:.0f} MiB")
    for name in sorted(spent, key=lambda n: -spent[n]):
        print(f"  {name:<40} {spent[name]:7.3f} s  ({calls[name]} calls)")


if __name__ == "__main__":
    main()
