"""Benchmark: averaging inputs larger than RAM, in one process and on 2 torchrun ranks.

Writes N safetensors checkpoints of S GB each (float32 tensors of T MB; tensor j of input i
holds i + j + arange/numel, so the expected mean of every tensor is known without reading the
inputs), then runs, each in its own process:

  one process   ckptavg average INPUTS -o OUT.safetensors
  2 ranks       torchrun --standalone --nproc-per-node 2 -m ckptavg average INPUTS -o OUT_DIR

and reports wall time and the peak RSS of every process (ru_maxrss; for torchrun, each rank's
own peak, read from /proc by the ranks' parent), then checks some output tensors against the
known mean. With N x S above the machine's RAM the inputs cannot all stay in the page cache:
the run reads from disk and memory must still stay at a few tensors.

    .venv/bin/python benchmarks/bench_scale.py --n 3 --size-gb 9 --dir /tmp/scale   # 27 GB
    .venv/bin/python benchmarks/bench_scale.py --n 3 --size-gb 1 --dir /tmp/scale   # quick

Needs N x S (inputs) + 2 S (outputs) of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# Runs `python -m ckptavg ARGS` and leaves this process's peak RSS in $RSS_OUT.$RANK.
RANK_RSS = r"""
import os, resource, runpy, sys
sys.argv = ["ckptavg"] + sys.argv[1:]
def note():
    with open(os.environ["RSS_OUT"] + "." + os.environ.get("RANK", "0"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
leave = os._exit
def _exit(code):  # the CLI leaves a torchrun rank with os._exit: note the peak first
    note()
    leave(code)
os._exit = _exit
try:
    runpy.run_module("ckptavg", run_name="__main__", alter_sys=True)
finally:
    note()
"""


def generate(folder: str, n: int, size_gb: float, tensor_mb: int) -> list[str]:
    import torch

    from ckptavg.io import TensorSpec
    from ckptavg.io.writer import SafetensorsWriter

    os.makedirs(folder, exist_ok=True)
    numel = tensor_mb * 2**20 // 4
    count = max(1, int(size_gb * 1024 // tensor_mb))
    specs = [TensorSpec(f"layer{j:04d}.weight", (numel,), torch.float32) for j in range(count)]
    ramp = torch.arange(numel, dtype=torch.float32) / numel
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"in-{i}.safetensors")
        paths.append(p)
        if os.path.exists(p) and os.path.getsize(p) > count * numel * 4:
            continue
        with SafetensorsWriter(p, specs, {"train.epoch": str(i + 1)}) as w:
            for j, s in enumerate(specs):
                w.write(s.key, ramp + float(i + j))
    return paths


def run(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def check(out: str, n: int, count: int, tensor_mb: int) -> None:
    import torch

    import ckptavg

    numel = tensor_mb * 2**20 // 4
    ramp = torch.arange(numel, dtype=torch.float32) / numel
    with ckptavg.open_checkpoint(out) as r:
        for j in sorted({0, count // 2, count - 1}):
            # the float64 mean of the float32 inputs as generate() wrote them, rounded once
            expect = torch.stack([(ramp + float(i + j)).double() for i in range(n)]).mean(0).float()
            got = r.read(f"layer{j:04d}.weight")
            assert torch.equal(got, expect), (out, j)
            r.release(f"layer{j:04d}.weight")


def _check_in_child(py: str, out: str, n: int, count: int, tensor_mb: int) -> None:
    subprocess.run([py, __file__, "--check", out, str(n), str(count), str(tensor_mb)],
                   check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--size-gb", type=float, default=9)
    ap.add_argument("--tensor-mb", type=int, default=256)
    ap.add_argument("--dir", default="bench-scale")
    ap.add_argument("--ranks", default="1,2", help="which runs: 1 (one process), 2 (torchrun)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    t0 = time.perf_counter()
    # Generated and checked in children: this process never imports torch, so the children
    # it starts do not inherit a large RSS (Linux counts the RSS a child had before exec, a
    # copy of this process, in its ru_maxrss: that inflated the one-process figure before).
    subprocess.run([py, __file__, "--generate", args.dir, str(args.n), str(args.size_gb),
                    str(args.tensor_mb)], check=True)
    paths = [os.path.join(args.dir, f"in-{i}.safetensors") for i in range(args.n)]
    gen_s = time.perf_counter() - t0
    total = sum(os.path.getsize(p) for p in paths)
    count = max(1, int(args.size_gb * 1024 // args.tensor_mb))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"{args.n} inputs, {total / 1e9:.1f} GB in all ({count} tensors of {args.tensor_mb} MB "
          f"each), RAM {mem / 2**30:.1f} GiB; generated in {gen_s:.0f} s")
    rows = {"n": args.n, "bytes_in": total, "ram": mem, "tensor_mb": args.tensor_mb}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    if "1" in args.ranks.split(","):
        out = os.path.join(args.dir, "out.safetensors")
        wall, rss = run([py, "-m", "ckptavg", "average", *paths, "-o", out, "-q"], env)
        _check_in_child(py, out, args.n, count, args.tensor_mb)
        os.unlink(out)
        rows["one_process"] = {"wall_s": wall, "peak_rss": rss}
        print(f"one process : {wall:7.1f} s, peak RSS {rss / 2**20:6.0f} MiB, "
              f"{total / wall / 1e6:.0f} MB/s read")
    if "2" in args.ranks.split(","):
        out = os.path.join(args.dir, "out-ranks")
        rss_out = os.path.join(args.dir, "rank-rss")
        wall, _ = run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "--no-python", py, "-c", RANK_RSS, "average",
                       *paths, "-o", out, "-q"], {**env, "RSS_OUT": rss_out})
        peaks = [int(open(f"{rss_out}.{r}").read()) for r in range(2)]
        _check_in_child(py, out, args.n, count, args.tensor_mb)
        shutil.rmtree(out)
        rows["two_ranks"] = {"wall_s": wall, "peak_rss_per_rank": peaks}
        print(f"2 ranks     : {wall:7.1f} s, peak RSS per rank "
              f"{', '.join(f'{p / 2**20:.0f}' for p in peaks)} MiB, "
              f"{total / wall / 1e6:.0f} MB/s read")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        folder, n, size_gb, tensor_mb = sys.argv[2:6]
        generate(folder, int(n), float(size_gb), int(tensor_mb))
    elif sys.argv[1:2] == ["--check"]:
        out, n, count, tensor_mb = sys.argv[2:6]
        check(out, int(n), int(count), int(tensor_mb))
    else:
        main()
