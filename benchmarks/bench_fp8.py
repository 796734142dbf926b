"""Benchmark: averaging FP8 checkpoints against bfloat16 ones of the same parameter count
(issue #36), side by side in one run.

Writes N safetensors inputs of P parameters twice: bfloat16 weights, and the same weights as
float8_e4m3fn codes with DeepSeek-V3's 128 x 128 block scales (`weight_scale_inv`), then runs
`ckptavg average` on each set in its own process, interleaved, R times: the bfloat16 set, the
FP8 set requantized (the default), the FP8 set written as bfloat16 (`--dtype bfloat16`). It
prints the median wall time, the peak RSS of the process (`ru_maxrss` of that child alone)
and whether torch was imported, and the ratios to the bfloat16 run.

    .venv/bin/python benchmarks/bench_fp8.py                      # 3 inputs of 64M parameters
    .venv/bin/python benchmarks/bench_fp8.py --n 6 --params-m 128 --repeats 5
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
CHILD = ("import sys\nfrom ckptavg.cli import main\ntry:\n    main(sys.argv[1:])\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('torch' in sys.modules, file=sys.stderr)\nsys.exit(code)\n")


def make_mx_inputs(folder: str, n: int, params_m: int) -> list[str]:
    """The same weights as MXFP4 (gpt-oss's layout: `*_blocks` [rows, G, 16] uint8 beside
    `*_scales` [rows, G] e8m0), quantized by the OCP rule (ckptavg's own `mx_quantize`:
    this only makes the inputs)."""
    import numpy as np
    from safetensors.numpy import save_file

    from ckptavg.engine.fp8 import mx_quantize

    rows, cols = 4096, 4096
    count = max(1, params_m * 2**20 // (rows * cols))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        b = {}
        for j in range(count):
            w = rng.standard_normal((rows, cols), dtype=np.float32) * (1 + 0.1 * i)
            flat = w.astype(np.float64).reshape(-1, 32)
            packed, exps = mx_quantize(flat, np.empty(flat.size, np.uint64))
            b[f"layers.{j}.proj_blocks"] = packed.reshape(rows, cols // 32, 16)
            b[f"layers.{j}.proj_scales"] = exps.reshape(rows, cols // 32)
        paths.append(os.path.join(folder, f"mx-{i}.safetensors"))
        save_file(b, paths[-1])
    return paths


def make_inputs(folder: str, n: int, params_m: int) -> tuple[list[str], list[str]]:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rows, cols = 4096, 4096  # 16M parameters per weight
    count = max(1, params_m * 2**20 // (rows * cols))
    rng = np.random.default_rng(0)
    bf16, fp8 = [], []
    for i in range(n):
        a, b = {}, {}
        for j in range(count):
            w = rng.standard_normal((rows, cols), dtype=np.float32) * (1 + 0.1 * i)
            a[f"layers.{j}.weight"] = w.astype(ml_dtypes.bfloat16)
            blocks = np.abs(w).reshape(rows // 128, 128, cols // 128, 128).max(axis=(1, 3))
            scale = (blocks / 448.0).astype(np.float32)
            full = np.repeat(np.repeat(scale, 128, 0), 128, 1)
            b[f"layers.{j}.weight"] = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
            b[f"layers.{j}.weight_scale_inv"] = scale
        bf16.append(os.path.join(folder, f"bf16-{i}.safetensors"))
        save_file(a, bf16[-1])
        fp8.append(os.path.join(folder, f"fp8-{i}.safetensors"))
        save_file(b, fp8[-1])
    return bf16, fp8


def run(paths: list[str], out: str, extra: list[str], root: str = ROOT
        ) -> tuple[float, int, bool]:
    """(wall seconds, peak RSS bytes of this child alone, torch imported), with the ckptavg
    of the checkout `root` (the child imports it from its working folder)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "average", *paths, "-o", out, "-q",
                             *extra], cwd=root, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(err)
    return wall, usage.ru_maxrss * 1024, err.strip().endswith("True")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--params-m", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="bench-fp8-tmp")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also run the FP8 cases with another checkout's ckptavg (e.g. a "
                         "`git worktree` of the previous commit), interleaved: before/after")
    ap.add_argument("--mxfp4", action="store_true",
                    help="also time MXFP4 inputs of the same parameter count (gpt-oss layout)")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.make_only:  # in a process of its own: a child forked from a parent holding the
        make_inputs(args.dir, args.n, args.params_m)  # inputs would count them in its RSS
        if args.mxfp4:
            make_mx_inputs(args.dir, args.n, args.params_m)
        return
    try:
        subprocess.run([sys.executable, __file__, "--make-only", "--dir", args.dir, "--n",
                        str(args.n), "--params-m", str(args.params_m)]
                       + (["--mxfp4"] if args.mxfp4 else []), check=True, cwd=ROOT)
        bf16 = [os.path.join(args.dir, f"bf16-{i}.safetensors") for i in range(args.n)]
        fp8 = [os.path.join(args.dir, f"fp8-{i}.safetensors") for i in range(args.n)]
        mx = [os.path.join(args.dir, f"mx-{i}.safetensors") for i in range(args.n)] \
            if args.mxfp4 else []
        for p in bf16 + fp8 + mx:  # into the page cache
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        cases = {"bf16 in, bf16 out": (bf16, [], ROOT),
                 "fp8 in, fp8 out (requantized)": (fp8, [], ROOT),
                 "fp8 in, bf16 out (--dtype)": (fp8, ["--dtype", "bfloat16"], ROOT)}
        if mx:
            cases["mxfp4 in, mxfp4 out"] = (mx, [], ROOT)
        if args.baseline:
            root = os.path.abspath(args.baseline)
            cases["baseline: fp8 requantized"] = (fp8, [], root)
            cases["baseline: fp8 --dtype"] = (fp8, ["--dtype", "bfloat16"], root)
        figures = {k: ([], [], []) for k in cases}
        for _ in range(args.repeats):
            for name, (paths, extra, root) in cases.items():
                out = os.path.join(args.dir, "out.safetensors")
                wall, rss, torch = run(paths, out, extra, root)
                figures[name][0].append(wall)
                figures[name][1].append(rss)
                figures[name][2].append(torch)
                os.remove(out)
        base_t = statistics.median(figures["bf16 in, bf16 out"][0])
        base_m = max(figures["bf16 in, bf16 out"][1])
        print(f"{args.n} inputs of {args.params_m}M parameters, {args.repeats} runs each, "
              f"{os.cpu_count()} cores")
        print(f"{'case':<32} {'median s':>9} {'x bf16':>7} {'peak RSS MB':>12} {'x bf16':>7} torch")
        for name, (walls, rsss, torches) in figures.items():
            t, m = statistics.median(walls), max(rsss)
            print(f"{name:<32} {t:9.2f} {t / base_t:7.2f} {m / 2**20:12.1f} {m / base_m:7.2f} "
                  f"{any(torches)}")
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
