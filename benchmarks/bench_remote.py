"""Benchmark: reading speed of `ckptavg average` from object storage and from a cold disk,
against the raw read of the same bytes, measured side by side in one run (issue #27).

    .venv/bin/python benchmarks/bench_remote.py                  # 4 x 256 MB, 3 repeats
    .venv/bin/python benchmarks/bench_remote.py --n 4 --size-mb 128 --json out.json

S3: a moto server on 127.0.0.1 (started here, data in its memory). "raw" is a loop of
ranged GETs of 8 MiB over every object, one after the other (what reading the inputs costs
at least, one connection at a time), and the same loop on 4 threads; ckptavg runs as a
subprocess averaging the objects into a local file, 1 process and 2 torchrun ranks (a
folder output); the same tensors saved as torch files (`.pt`, read through the zip and
CRC-checked); torch files of a ResNet-50's state dict (320 tensors, against the raw loop over
those objects); and the safetensors objects into an S3 output (streamed as a multipart
upload). Disk (root only: the page cache is dropped before every run): `cat` of the inputs
against `ckptavg average` of them, its output on the same disk and on tmpfs (/dev/shm: what
reading costs without the output's writes competing for the disk). The methods run in a
rotated order each round (the first of a round pays the previous round's writeback); the
ratios are the median of each round's own ratio. GiB/s counts the input bytes; per rank,
those a rank reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_inputs(folder: str, n: int, size_mb: int, torch_files: bool) -> list[str]:
    from safetensors.numpy import save_file

    paths = []
    per = 4 * 1024 * 1024  # 16 MB float32 tensors
    for i in range(n):
        rng = np.random.default_rng(i)
        tensors = {f"t{j:03d}": rng.standard_normal(per, dtype=np.float32)
                   for j in range(size_mb // 16)}
        p = os.path.join(folder, f"epoch-{i + 1:04d}.safetensors")
        save_file(tensors, p)
        paths.append(p)
        if torch_files:
            import torch

            torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}},
                       os.path.join(folder, f"epoch-{i + 1:04d}.pt"))
    return paths


def _write_resnets(folder: str, n: int) -> list[str]:
    """n torch files of a ResNet-50's state dict (320 tensors, 98 MB: what a user's
    torchvision checkpoint is), each its own weights."""
    import torch
    import torchvision

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        p = os.path.join(folder, f"resnet50-{i + 1}.pt")
        torch.save({"state_dict": torchvision.models.resnet50().state_dict()}, p)
        paths.append(p)
    return paths


def _rounds(methods: dict, repeats: int, results: dict) -> None:
    """Each method once per round, the order rotated round by round."""
    names = list(methods)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(methods[name]())


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _timed(cmd, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--sources", default="s3,disk", help="s3, disk or s3,disk")
    args = ap.parse_args()
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    work = tempfile.mkdtemp(prefix="ckptavg-bench-remote-")
    port = _port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    py = sys.executable
    try:
        s3_on, disk_on = "s3" in args.sources, "disk" in args.sources
        paths = _write_inputs(work, args.n, args.size_mb, torch_files=s3_on)
        total = sum(os.path.getsize(p) for p in paths)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        resnets = _write_resnets(work, args.n) if s3_on else []
        resnet_bytes = sum(os.path.getsize(p) for p in resnets)
        for p in paths if s3_on else []:
            client.upload_file(p, "bench", f"run/{os.path.basename(p)}")
            pt = p.replace(".safetensors", ".pt")
            client.upload_file(pt, "bench", f"pt/{os.path.basename(pt)}")
        for p in resnets:
            client.upload_file(p, "bench", f"r50/{os.path.basename(p)}")
        fs = s3fs.S3FileSystem()
        keys = [f"bench/run/{os.path.basename(p)}" for p in paths]

        def raw_get(key):
            size = fs.info(key)["size"]
            for off in range(0, size, 8 << 20):
                fs.cat_file(key, start=off, end=min(off + (8 << 20), size))

        def raw_loop(objects=keys):
            t = time.perf_counter()
            for k in objects:
                raw_get(k)
            return time.perf_counter() - t

        def raw_threads():
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(raw_get, keys))
            return time.perf_counter() - t

        def ckptavg(*args_, cold=False, clear=None):
            if clear:
                shutil.rmtree(clear, ignore_errors=True)
            if cold:
                _drop_caches()
            return _timed([py, "-m", "ckptavg", "average", *args_, "-q"], env)

        def two_ranks(*args_, cold=False, clear=None):
            if clear:
                shutil.rmtree(clear, ignore_errors=True)
            if cold:
                _drop_caches()
            return _timed([py, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "ckptavg", "average", *args_, "-q"],
                          env)

        def cat():
            _drop_caches()
            return _timed(["sh", "-c", "cat \"$@\" > /dev/null", "cat", *paths])

        def remove_s3_output():
            fs.invalidate_cache()
            if fs.exists("bench/out/o.safetensors"):
                fs.rm_file("bench/out/o.safetensors")

        src = "s3://bench/run/epoch-*.safetensors"
        o2 = os.path.join(work, "o2")
        d2 = os.path.join(work, "d2")
        s3_methods = {
            "s3 raw GET loop": raw_loop,
            "s3 raw GET loop, 4 threads": raw_threads,
            "s3 ckptavg 1 process": lambda: ckptavg(src, "-o", os.path.join(work, "o.safetensors")),
            "s3 ckptavg 1 process, torch files": lambda: ckptavg(
                "s3://bench/pt/epoch-*.pt", "-o", os.path.join(work, "p.safetensors")),
            "s3 raw GET loop, ResNet-50 torch files": lambda: raw_loop(
                [f"bench/r50/{os.path.basename(p)}" for p in resnets]),
            "s3 ckptavg 1 process, ResNet-50 torch files": lambda: ckptavg(
                "s3://bench/r50/resnet50-*.pt", "-o", os.path.join(work, "r.safetensors")),
            "s3 ckptavg 1 process, output to s3": lambda: (remove_s3_output(), ckptavg(
                src, "-o", "s3://bench/out/o.safetensors"))[1],
            "s3 ckptavg 2 ranks": lambda: two_ranks(src, "-o", o2, clear=o2),
        }
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else work
        disk_methods = {
            "disk cat (cold)": cat,
            "disk ckptavg 1 process (cold)": lambda: ckptavg(
                *paths, "-o", os.path.join(work, "d.safetensors"), cold=True),
            "disk ckptavg 1 process, output on tmpfs (cold)": lambda: ckptavg(
                *paths, "-o", os.path.join(shm, "ckptavg-bench.safetensors"), cold=True),
            "disk ckptavg 2 ranks (cold)": lambda: two_ranks(*paths, "-o", d2, cold=True, clear=d2),
        }
        results: dict[str, list[float]] = {k: [] for k in [*s3_methods, *disk_methods]}
        cold = disk_on and _drop_caches()
        if s3_on:
            _rounds(s3_methods, args.repeats, results)
        if cold:
            _rounds(disk_methods, args.repeats, results)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(shm, "ckptavg-bench.safetensors"))
        print(f"{args.n} inputs of {args.size_mb} MB ({total / GIB:.2f} GiB in), median of "
              f"{args.repeats}; GiB/s of input bytes (per rank: each rank reads half)")
        rows = {}
        for name, ts in results.items():
            if not ts:
                continue
            med = statistics.median(ts)
            ranks = 2 if "2 ranks" in name else 1
            read = resnet_bytes if "ResNet" in name else total
            rows[name] = {"seconds": ts, "median_s": med, "bytes": read,
                          "gib_per_s": read / GIB / med,
                          "gib_per_s_per_rank": read / GIB / med / ranks}
            print(f"  {name:<48} {med:7.2f} s  {read / GIB / med:6.2f} GiB/s"
                  + (f"  ({read / GIB / med / ranks:.2f} per rank)" if ranks > 1 else ""))
        ratios = {}

        def ratio(name: str, raw: str) -> None:
            per_round = [a / b for a, b in zip(results[raw], results[name])]
            ratios[name] = {"against": raw, "per_round": per_round,
                            "median": statistics.median(per_round)}
            print(f"ratio {name} / {raw}: {ratios[name]['median']:.2f} (median of the rounds' "
                  f"own ratios {', '.join(f'{x:.2f}' for x in per_round)}; target >= 0.8)")

        if s3_on:
            for name in ("s3 ckptavg 1 process", "s3 ckptavg 1 process, torch files",
                         "s3 ckptavg 1 process, output to s3"):
                ratio(name, "s3 raw GET loop")
            ratio("s3 ckptavg 1 process, ResNet-50 torch files",
                  "s3 raw GET loop, ResNet-50 torch files")
        if cold:
            for name in ("disk ckptavg 1 process (cold)",
                         "disk ckptavg 1 process, output on tmpfs (cold)"):
                ratio(name, "disk cat (cold)")
        elif disk_on:
            print("disk (cold): skipped (dropping the page cache needs root)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"n": args.n, "size_mb": args.size_mb, "bytes": total, "rows": rows,
                           "ratios": ratios}, f, indent=2)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
