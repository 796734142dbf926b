"""Benchmark: reading speed of `ckptavg average` from object storage and from a cold disk,
against the raw read of the same bytes, measured side by side in one run (issue #27).

    .venv/bin/python benchmarks/bench_remote.py                  # 4 x 256 MB, 3 repeats
    .venv/bin/python benchmarks/bench_remote.py --n 4 --size-mb 128 --json out.json

S3: a moto server on 127.0.0.1 (started here, data in its memory). "raw" is a loop of
ranged GETs of 8 MiB over every object, one after the other (what reading the inputs costs
at least, one connection at a time), and the same loop on 4 threads; ckptavg runs as a
subprocess averaging the objects into a local file, 1 process and 2 torchrun ranks (a
folder output). Disk (root only: the page cache is dropped before every run): `cat` of the
inputs against `ckptavg average` of them. GiB/s counts the input bytes; per rank, those a
rank reads.
"""

from __future__ import annotations

import argparse
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


def _write_inputs(folder: str, n: int, size_mb: int) -> list[str]:
    from safetensors.numpy import save_file

    paths = []
    per = 4 * 1024 * 1024  # 16 MB float32 tensors
    for i in range(n):
        rng = np.random.default_rng(i)
        tensors = {f"t{j}": rng.standard_normal(per, dtype=np.float32)
                   for j in range(size_mb // 16)}
        p = os.path.join(folder, f"epoch-{i + 1:04d}.safetensors")
        save_file(tensors, p)
        paths.append(p)
    return paths


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
        paths = _write_inputs(work, args.n, args.size_mb)
        total = sum(os.path.getsize(p) for p in paths)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="bench")
        for p in paths if "s3" in args.sources else []:
            client.upload_file(p, "bench", f"run/{os.path.basename(p)}")
        fs = s3fs.S3FileSystem()
        keys = [f"bench/run/{os.path.basename(p)}" for p in paths]

        def raw_get(key):
            size = fs.info(key)["size"]
            for off in range(0, size, 8 << 20):
                fs.cat_file(key, start=off, end=min(off + (8 << 20), size))

        results: dict[str, list[float]] = {k: [] for k in (
            "s3 raw GET loop", "s3 raw GET loop, 4 threads", "s3 ckptavg 1 process",
            "s3 ckptavg 2 ranks", "disk cat (cold)", "disk ckptavg 1 process (cold)",
            "disk ckptavg 2 ranks (cold)")}
        src = "s3://bench/run/epoch-*.safetensors"
        cold = _drop_caches()
        s3_on, disk_on = "s3" in args.sources, "disk" in args.sources
        cold = cold and disk_on
        for _ in range(args.repeats if s3_on else 0):
            t = time.perf_counter()
            for k in keys:
                raw_get(k)
            results["s3 raw GET loop"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(raw_get, keys))
            results["s3 raw GET loop, 4 threads"].append(time.perf_counter() - t)
            results["s3 ckptavg 1 process"].append(_timed(
                [py, "-m", "ckptavg", "average", src, "-o", os.path.join(work, "o.safetensors"),
                 "-q"], env))
            shutil.rmtree(os.path.join(work, "o2"), ignore_errors=True)
            results["s3 ckptavg 2 ranks"].append(_timed(
                [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "ckptavg", "average", src, "-o", os.path.join(work, "o2"), "-q"], env))
        for _ in range(args.repeats if cold else 0):
            if cold:
                _drop_caches()
                results["disk cat (cold)"].append(_timed(["sh", "-c", "cat \"$@\" > /dev/null",
                                                          "cat", *paths]))
                _drop_caches()
                results["disk ckptavg 1 process (cold)"].append(_timed(
                    [py, "-m", "ckptavg", "average", *paths, "-o",
                     os.path.join(work, "d.safetensors"), "-q"], env))
                _drop_caches()
                shutil.rmtree(os.path.join(work, "d2"), ignore_errors=True)
                results["disk ckptavg 2 ranks (cold)"].append(_timed(
                    [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "ckptavg", "average", *paths, "-o", os.path.join(work, "d2"), "-q"],
                    env))
        print(f"{args.n} inputs of {args.size_mb} MB ({total / GIB:.2f} GiB in), median of "
              f"{args.repeats}; GiB/s of input bytes (per rank: each rank reads half)")
        rows = {}
        for name, ts in results.items():
            if not ts:
                continue
            med = statistics.median(ts)
            ranks = 2 if "2 ranks" in name else 1
            rows[name] = {"seconds": ts, "median_s": med, "gib_per_s": total / GIB / med,
                          "gib_per_s_per_rank": total / GIB / med / ranks}
            print(f"  {name:<32} {med:7.2f} s  {total / GIB / med:6.2f} GiB/s"
                  + (f"  ({total / GIB / med / ranks:.2f} per rank)" if ranks > 1 else ""))
        if s3_on:
            raw = rows["s3 raw GET loop"]["gib_per_s"]
            print(f"ratio s3 ckptavg 1 process / raw GET loop: "
                  f"{rows['s3 ckptavg 1 process']['gib_per_s'] / raw:.2f} (target >= 0.8)")
        if cold:
            cat = rows["disk cat (cold)"]["gib_per_s"]
            print(f"ratio disk ckptavg 1 process / cat (cold): "
                  f"{rows['disk ckptavg 1 process (cold)']['gib_per_s'] / cat:.2f} (target >= 0.8)")
        else:
            print("disk (cold): skipped (dropping the page cache needs root)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"n": args.n, "size_mb": args.size_mb, "bytes": total, "rows": rows},
                          f, indent=2)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
