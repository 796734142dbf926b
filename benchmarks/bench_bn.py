"""Benchmark: `ckptavg` BatchNorm recalibration against torch.optim.swa_utils.update_bn.

Same model, same loader (fixed order, no augmentation), same semantics; interleaved runs in
one process; prints the wall times, their ratio and checks that the statistics agree.

    .venv/bin/python benchmarks/bench_bn.py --data-dir ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch.optim.swa_utils import update_bn

from ckptavg.nn.bn import recalibrate
from ckptavg.nn.data import get_dataset, make_loader
from ckptavg.nn.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    ap.add_argument("--model", default="preresnet20")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ds = get_dataset(args.data, "train", args.data_dir)
    loader = make_loader(ds, args.batch_size, subset=args.subset)
    if dev.type == "cuda":  # keep the data on the GPU so that both sides time the model
        loader = [(x.to(dev), y.to(dev)) for x, y in loader]
    info = ds.x.shape[1] if hasattr(ds, "x") else 3
    base = create_model(args.model, num_classes=10, in_channels=info).to(dev)
    times = {"ckptavg": [], "update_bn": []}
    for _ in range(args.repeats):
        for name in times:
            net = copy.deepcopy(base)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "ckptavg":
                recalibrate(net, loader, device=dev)
            else:
                update_bn(loader, net, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            if name == "ckptavg":
                ours = net
            else:
                ref = net
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
               zip(ours.state_dict().values(), ref.state_dict().values()))
    n = args.subset
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} on {n} {args.data} images, batch {args.batch_size}, {dev}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved runs (median):")
    for k, v in med.items():
        print(f"  {k:<10} {v:6.2f} s  {n / v:8.0f} images/s   runs: "
              + ", ".join(f"{t:.2f}" for t in times[k]))
    print(f"  ratio ckptavg / update_bn = {med['ckptavg'] / med['update_bn']:.3f} (target <= 1.05); "
          f"statistics equal: {same}")


if __name__ == "__main__":
    main()
