"""Benchmark: the cost of per-epoch checkpoints in `ckptavg train`.

Trains the same run twice per repeat, with `--save none` and `--save epoch`, interleaved, and
prints the epoch times, the time the loop was blocked by saving (device-to-host copy and
queueing; the write itself runs in a background thread) and the overhead ratio.

    .venv/bin/python benchmarks/bench_train_save.py --data-dir ../shared/data/fashion-mnist
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from ckptavg.train.loop import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preresnet20")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true")
    args = ap.parse_args()
    res: dict[str, list] = {"none": [], "epoch": []}
    blocked = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.repeats):
            for save in res:
                cfg = TrainConfig(model=args.model, data=args.data, data_dir=args.data_dir,
                                  epochs=args.epochs, out=os.path.join(d, f"{save}-{r}"),
                                  schedule="sgd", lr=0.05, train_images=args.subset, save=save,
                                  eval_every=0, amp=args.amp)
                s = train(cfg, device=args.device)
                res[save].append(s["epoch_seconds"] / s["epochs_run"])
                if save == "epoch":
                    blocked.append(s["save_blocking_seconds"] / s["epochs_run"])
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"{args.model}, {args.subset} {args.data} images, {args.epochs} epochs x "
          f"{args.repeats} repeats (median seconds per epoch):")
    print(f"  --save none   {med['none']:.3f} s")
    print(f"  --save epoch  {med['epoch']:.3f} s   loop blocked by saving: "
          f"{statistics.median(blocked) * 1000:.1f} ms per epoch")
    print(f"  overhead (epoch - none) / none = {(med['epoch'] - med['none']) / med['none'] * 100:+.2f} %; "
          f"blocked / epoch = {statistics.median(blocked) / med['epoch'] * 100:.3f} % (target <= 2 %)")


if __name__ == "__main__":
    main()
