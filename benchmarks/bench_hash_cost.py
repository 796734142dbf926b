"""Benchmark: what the content hashes of the read pass cost (issue #33, item 1).

Runs `ckptavg average` on the same inputs with and without the content hashes, interleaved,
each in its own process, R times, and prints the median and best wall time and CPU time of
each and their ratio. "without" is the same code with the hashes switched off in the child
(`engine.average.ContentHashes` replaced by a stand-in that takes none: the output then keeps
its placeholders), so the two differ by the hashing alone.

    .venv/bin/python benchmarks/bench_hash_cost.py                       # 6 x 256 MB .safetensors
    .venv/bin/python benchmarks/bench_hash_cost.py --n 12 --size-mb 512 --format pt --repeats 15
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFF = ("import sys, ckptavg.engine.average as a; a.ContentHashes = lambda *x, **k: None; "
       "from ckptavg.cli import main; sys.argv[0] = 'ckptavg'; main()")
ON = ("import sys, ckptavg.engine.average as a; "  # the same imports as OFF, in the same order
      "from ckptavg.cli import main; sys.argv[0] = 'ckptavg'; main()")


def make_inputs(folder: str, n: int, size_mb: int, fmt: str) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(0)
    per = 4_000_000  # float32 tensors of 16 MB
    count = max(1, size_mb * 2**20 // (per * 4))
    paths = []
    for i in range(n):
        state = {f"t{j}": rng.standard_normal(per, dtype=np.float32) for j in range(count)}
        if fmt == "pt":
            import torch

            p = os.path.join(folder, f"in{i}.pt")
            torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, p)
        else:
            from safetensors.numpy import save_file

            p = os.path.join(folder, f"in{i}.safetensors")
            save_file(state, p)
        paths.append(p)
    return paths


def run(code: str, paths: list[str], out: str) -> tuple[float, float]:
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "average", *paths, "-o", out, "-q"],
                   cwd=ROOT, check=True)
    wall = time.perf_counter() - t
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dir", default="bench-hash-tmp")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    try:
        paths = make_inputs(args.dir, args.n, args.size_mb, args.format)
        out = os.path.join(args.dir, "out.safetensors")
        for p in paths:  # into the page cache
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        figures = {"with hashes": ([], []), "without": ([], [])}
        for _ in range(args.repeats):
            for name, code in (("with hashes", ON), ("without", OFF)):
                wall, cpu = run(code, paths, out)
                figures[name][0].append(wall)
                figures[name][1].append(cpu)
        print(f"N={args.n} {args.format} inputs of {args.size_mb} MB, {args.repeats} runs each, "
              "interleaved")
        for name, (walls, cpus) in figures.items():
            print(f"  {name:12s} wall median {statistics.median(walls):.3f} s (best "
                  f"{min(walls):.3f})  CPU median {statistics.median(cpus):.3f} s")
        w, wo = figures["with hashes"], figures["without"]
        print(f"  ratio, wall median {statistics.median(w[0]) / statistics.median(wo[0]):.3f}, "
              f"best {min(w[0]) / min(wo[0]):.3f}, CPU median "
              f"{statistics.median(w[1]) / statistics.median(wo[1]):.3f} (target <= 1.10)")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
