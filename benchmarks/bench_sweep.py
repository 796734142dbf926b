"""Benchmark: `average --sweep` against separate `average` runs and the I/O floor (issue #38),
side by side in one run.

Writes N bfloat16 (or --dtype float32, float16) safetensors inputs of P parameters, then, interleaved, R times:
- sweep: `ckptavg average INPUTS --sweep window=W,stride=1 -o DIR` (N - W + 1 outputs);
- separate: one `ckptavg average` process per window (the same outputs);
- floor: a process that reads every input once (pread in 8 MiB pieces) and writes the
  same number of outputs of the same size (written, fsynced and renamed, as ckptavg
  commits a file): what any tool that reads once and writes every window must do.
It prints the median wall time of each, the ratios (sweep / floor, separate / sweep), and
the peak RSS of the sweep's process (`ru_maxrss` of that child alone); then the sweep's
peak RSS at twice N and twice W, to show that memory does not grow with them.

    .venv/bin/python benchmarks/bench_sweep.py                    # N=12, W=4, 16M params
    .venv/bin/python benchmarks/bench_sweep.py --params-m 64 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = r"""
import os, sys
n_out, size, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
buf = bytearray(8 << 20)
view = memoryview(buf)
for p in sys.argv[4:]:
    fd = os.open(p, os.O_RDONLY)
    off = 0
    while True:
        k = os.preadv(fd, [view], off)
        if not k:
            break
        off += k
    os.close(fd)
for j in range(n_out):
    tmp = os.path.join(out_dir, f".w{j}.tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            left -= f.write(view[:min(left, len(view))])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, f"w{j}.safetensors"))
"""


def make_inputs(folder: str, n: int, params_m: int, dtype: str = "bfloat16") -> list[str]:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rows, cols = 2048, 2048  # 4M parameters per tensor
    count = max(1, params_m * 2**20 // (rows * cols))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        state = {f"layers.{j}.weight": (rng.standard_normal((rows, cols), dtype=np.float32))
                 .astype(kind) for j in range(count)}
        state["layers.norm.weight"] = np.ones(cols, kind)
        paths.append(os.path.join(folder, f"step-{(i + 1) * 100:05d}.safetensors"))
        save_file(state, paths[-1], metadata={"train.step": str((i + 1) * 100)})
    return paths


def child(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of this child alone)."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read())
    return wall, usage.ru_maxrss * 1024


def ckptavg(*args: str) -> list[str]:
    return [sys.executable, "-m", "ckptavg", "average", *args, "-q"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--params-m", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dir", default="bench-sweep-tmp")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dir = os.path.abspath(args.dir)  # the children run in the repository root
    os.makedirs(args.dir, exist_ok=True)
    if args.make_only:  # in a process of its own (its RSS is not the children's)
        make_inputs(args.dir, 2 * args.n, args.params_m, args.dtype)
        return
    try:
        subprocess.run([sys.executable, __file__, "--make-only", "--dir", args.dir, "--n",
                        str(args.n), "--params-m", str(args.params_m), "--dtype", args.dtype],
                       check=True)
        every = sorted(os.path.join(args.dir, f) for f in os.listdir(args.dir)
                       if f.endswith(".safetensors"))
        paths = every[:args.n]
        os.sync()
        for p in every:  # into the page cache
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        w = args.window
        k = args.n - w + 1
        size = os.path.getsize(paths[0])
        out = os.path.join(args.dir, "out")
        figures: dict[str, list[float]] = {"sweep": [], "separate": [], "floor": []}
        rss = []
        for _ in range(args.repeats):
            for name in figures:
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                os.sync()  # no case pays for the write-back of the one before
                if name == "sweep":
                    t, m = child(ckptavg(*paths, "--sweep", f"window={w}", "-o", out))
                    rss.append(m)
                elif name == "separate":
                    t = 0.0
                    for j in range(k):
                        t += child(ckptavg(*paths[j:j + w], "-o",
                                           os.path.join(out, f"w{j}.safetensors")))[0]
                else:
                    t, _ = child([sys.executable, "-c", FLOOR, str(k), str(size), out, *paths])
                figures[name].append(t)
        med = {name: statistics.median(v) for name, v in figures.items()}
        print(f"N={args.n} {args.dtype} inputs of {args.params_m}M parameters "
              f"({size / 2**20:.0f} MiB each), window {w}, stride 1: {k} outputs; "
              f"{args.repeats} runs each, median; {os.cpu_count()} cores; inputs in page cache")
        print(f"{'case':<44} {'seconds':>8} {'x floor':>8}")
        for name, label in (("floor", "I/O floor: read N once, write K outputs"),
                            ("sweep", "ckptavg average --sweep (one process)"),
                            ("separate", f"{k} separate ckptavg average runs")):
            print(f"{label:<44} {med[name]:8.2f} {med[name] / med['floor']:8.2f}")
        print(f"separate / sweep: {med['separate'] / med['sweep']:.2f}x; sweep / floor: "
              f"{med['sweep'] / med['floor']:.2f}x")
        print(f"sweep peak RSS: {max(rss) / 2**20:.0f} MiB at N={args.n}, W={w}", end="")
        for n2, w2 in ((2 * args.n, w), (2 * args.n, 2 * w)):
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            os.sync()
            _, m = child(ckptavg(*every[:n2], "--sweep", f"window={w2}", "-o", out))
            print(f"; {m / 2**20:.0f} MiB at N={n2}, W={w2}", end="")
        print()
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
