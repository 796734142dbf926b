"""Width of optima along random rays (SWA paper, Figure 4).

Directions are uniform on the unit sphere over all parameters (one Gaussian vector,
normalised); ray r uses the same direction for both solutions. At each distance t the
weights are w + t d, BatchNorm is recalibrated (unless disabled), and the test error and
the training loss are measured.
"""

from __future__ import annotations

import csv
import math
import os
import time

import torch


def _direction(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))
    return {n: v / norm for n, v in d.items()}


def width(a: str, b: str, *, data: str | None = None, data_dir: str | None = None,
          download: bool = False, model: str | None = None, model_kwargs: dict | None = None,
          labels: tuple[str, str] | None = None, rays: int = 10,
          points: int = 21, max_distance: float = 10.0, bn_fix: bool = True,
          train_subset: int | None = 5000, test_subset: int | None = None,
          batch_size: int = 256, seed: int = 0, device: str = "auto",
          csv_path: str | None = None, plot_path: str | None = None, progress=None) -> dict:
    """Test error and train loss of two solutions along the same random rays.

    Returns:
        {"rows": [{solution, ray, distance, test_error, train_loss}, ...], "csv", "plot"}.
    """
    from ckptavg.bn import recalibrate, resolve_device
    from ckptavg.data import get_dataset, make_loader
    from ckptavg.errors import CkptavgError
    from ckptavg.evaluation import predict, scores
    from ckptavg.modelio import build_from_checkpoint

    if rays < 1 or points < 2 or max_distance <= 0:
        raise CkptavgError("--rays >= 1, --points >= 2 and --max-distance > 0 are needed")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    labels = labels or (os.path.basename(a), os.path.basename(b))
    nets = []
    for path in (a, b):
        net, _, _, name = build_from_checkpoint(path, model, model_kwargs, data, data_dir)
        nets.append(net.to(dev))
        data = data or name
    train = get_dataset(data, "train", data_dir, augment=False, download=download)
    test = get_dataset(data, "test", data_dir, augment=False, download=download)
    train_loader = make_loader(train, batch_size, subset=train_subset, device=str(dev))
    test_loader = make_loader(test, batch_size, subset=test_subset, device=str(dev))
    distances = [max_distance * i / (points - 1) for i in range(points)]
    bases = [{n: p.detach().clone() for n, p in net.named_parameters()} for net in nets]
    total = rays * points * 2
    done = 0
    rows: list[dict] = []
    at_zero: dict[int, tuple[float, float]] = {}

    def measure(net) -> tuple[float, float]:
        if bn_fix:
            recalibrate(net, train_loader, device=dev)
        test_s = scores(*predict(net, test_loader, dev))
        train_s = scores(*predict(net, train_loader, dev))
        return 100.0 - test_s["accuracy"], train_s["loss"]

    for r in range(rays):
        d = _direction(nets[0], seed * 100_003 + r)
        for s, (net, base) in enumerate(zip(nets, bases)):
            for t in distances:
                if t == 0 and s in at_zero:
                    err, loss = at_zero[s]  # the centre is the same on every ray
                else:
                    with torch.no_grad():
                        for n, p in net.named_parameters():
                            p.copy_(base[n] + t * d[n].to(p.device))
                    err, loss = measure(net)
                    if t == 0:
                        at_zero[s] = (err, loss)
                rows.append({"solution": labels[s], "ray": r, "distance": t,
                             "test_error": err, "train_loss": loss})
                done += 1
                if progress:
                    progress(done, total)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if plot_path:
        plot_width(rows, plot_path, title=f"{data}: {labels[0]} vs {labels[1]}")
    return {"rows": rows, "csv": csv_path, "plot": plot_path, "labels": list(labels),
            "seconds": time.perf_counter() - t0}


def plot_width(rows: list[dict], path: str, title: str = "") -> None:
    """Median and min-max band over rays of test error and train loss, per solution."""
    from ckptavg.experiments.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["solution"] for r in rows):
        mine = [r for r in rows if r["solution"] == label]
        ts = sorted({r["distance"] for r in mine})
        for ax, key in zip(axes, ("test_error", "train_loss")):
            vals = [sorted(r[key] for r in mine if r["distance"] == t) for t in ts]
            med = [v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
                   for v in vals]
            line, = ax.plot(ts, med, label=label)
            ax.fill_between(ts, [v[0] for v in vals], [v[-1] for v in vals], alpha=0.2,
                            color=line.get_color())
    axes[0].set_ylabel("test error (%)")
    axes[1].set_ylabel("train loss")
    for ax in axes:
        ax.set_xlabel("distance along random ray")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
