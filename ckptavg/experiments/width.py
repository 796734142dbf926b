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
import statistics
import time
from dataclasses import dataclass, fields, replace

import torch

from ckptavg import options
from ckptavg.errors import OptionError
from ckptavg.io.atomic import AtomicFile, atomic_text
from ckptavg.nn.bn import recalibrate
from ckptavg.nn.build import network
from ckptavg.nn.data import make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import predict, scores
from ckptavg.options import DataOptions, LoaderOptions, ModelOptions
from ckptavg.plots import pyplot
from ckptavg.results import Result

WIDTH_TRAIN_IMAGES = 5000  # training images for the train loss and BatchNorm, by default


def _direction(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()}
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))
    return {n: v / norm for n, v in d.items()}


def _unit(d: dict, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A caller's direction over every parameter of `net`, scaled to unit length."""
    missing = [n for n, _ in net.named_parameters() if n not in d]
    if missing:
        raise OptionError("directions", f"each direction gives every parameter; missing "
                          f"{', '.join(missing[:3])}")
    norm = math.sqrt(sum(float((d[n].double() ** 2).sum()) for n, _ in net.named_parameters()))
    if not norm > 0:
        raise OptionError("directions", "a direction of length 0 goes nowhere")
    return {n: (d[n].double() / norm).to(p.dtype) for n, p in net.named_parameters()}


@dataclass
class WidthSummary(Result):
    label: str
    centre_test_error: float
    median_test_error_at_max: float  # median over rays at the largest distance


@dataclass
class WidthPoint(Result):
    """One measured point: a solution moved `distance` along random ray `ray`."""

    solution: str
    ray: int
    distance: float
    test_error: float  # %
    train_loss: float


@dataclass
class WidthResult(Result):
    """Every measured point, one summary line per solution, and the files written."""

    labels: list[str]
    max_distance: float
    rows: list[WidthPoint]
    summary: list[WidthSummary]
    csv: str | None
    plot: str | None
    seconds: float


def width(a: str, b: str, *, model: ModelOptions | str | None = None,
          data: DataOptions | str | None = None, loader: LoaderOptions | None = None,
          labels: tuple[str, str] | None = None, rays: int = 10,
          points: int = 21, max_distance: float = 10.0, bn_fix: bool = True,
          train_images: int | None = WIDTH_TRAIN_IMAGES, eval_images: int | None = None,
          seed: int = options.SEED, directions: list[dict] | None = None,
          csv_path: str | None = None, plot_path: str | None = None, progress=None) -> WidthResult:
    """Test error and train loss of two solutions along the same random rays.

    Args:
        a, b: the two checkpoints (e.g. the SGD and SWA solutions).
        labels: their names in the CSV and the plot (default: the files' names).
        rays, points, max_distance: `points` evenly spaced distances in [0, max_distance]
            along each of `rays` random unit directions (the same directions for both).
        model, data, loader: as for `evaluate` (`loader`'s batch size and device are used).
        bn_fix: recalibrate BatchNorm at every point.
        train_images: the first N training images give the train loss and the BatchNorm
            pass (None: all; the default, 5000, takes all when there are fewer; more than
            there are is an OptionError).
        eval_images: the first N test images (None: all).
        seed: ray r's direction is drawn from a generator seeded with seed * 100003 + r.
        directions: the rays themselves instead (one {parameter name: tensor} each, any
            norm: each is scaled to unit length over all parameters); `rays` is then their
            number.
        csv_path, plot_path: where to write every number and the plot (atomically); with a
            plot and no `csv_path`, the numbers go beside it (`width.png` -> `width.csv`).
        progress: called with (points scored, points in all).

    Returns:
        A WidthResult; `summary` has each solution's test error at the centre and the
        median over rays at `max_distance`.

    Example:
        >>> r = width("runs/a/epoch-0001.safetensors", "swa.safetensors", rays=1, points=2,
        ...           bn_fix=False, eval_images=200, train_images=200)
        >>> len(r.rows), [s.label for s in r.summary]
        (4, ['epoch-0001.safetensors', 'swa.safetensors'])
    """
    ld, chosen = LoaderOptions.of(loader), DataOptions.of(data)
    batch_size, device = ld.batch_size, ld.device
    if directions is not None:
        rays = len(directions)
    if rays < 1 or points < 2 or max_distance <= 0:
        raise OptionError(("rays", "points", "max_distance"), "need rays >= 1, points >= 2 "
                          "and max_distance > 0")
    if labels is not None and len(labels) != 2:
        raise OptionError("labels", "give two names, e.g. SGD,SWA", repr(labels))
    if plot_path:
        pyplot()  # without matplotlib, fail before the long measurement, not after it
    t0 = time.perf_counter()
    dev = resolve_device(device)
    labels = tuple(labels or (os.path.basename(a), os.path.basename(b)))
    nets = []
    for path in (a, b):  # the second on the first one's data set (and folder)
        built = network(path, model, chosen)
        nets.append(built.net.to(dev))
        chosen = replace(chosen, data=built.data, data_dir=built.data_dir)
    train, test = built.dataset("train"), built.dataset("test")
    if train_images == WIDTH_TRAIN_IMAGES:  # the default: all images when there are fewer
        train_images = min(train_images, len(train))
    train_loader = make_loader(train, batch_size, subset=train_images, device=str(dev),
                               subset_option="train_images")
    test_loader = make_loader(test, batch_size, subset=eval_images, device=str(dev),
                              subset_option="eval_images")
    distances = [max_distance * i / (points - 1) for i in range(points)]
    bases = [{n: p.detach().clone() for n, p in net.named_parameters()} for net in nets]
    total = rays * points * 2
    rows: list[WidthPoint] = []
    at_zero: dict[int, tuple[float, float]] = {}

    def measure(net) -> tuple[float, float]:
        if bn_fix:
            recalibrate(net, train_loader, device=dev)
        test_s = scores(*predict(net, test_loader, dev))
        train_s = scores(*predict(net, train_loader, dev))
        return 100.0 - test_s.accuracy, train_s.loss

    if progress:
        progress(0, total)  # the networks and the data are good: the measurement starts
    for r in range(rays):
        d = _direction(nets[0], seed * 100_003 + r) if directions is None else \
            _unit(directions[r], nets[0])
        for s, (net, base) in enumerate(zip(nets, bases)):
            for i, t in enumerate(distances):
                if i == 0 and s in at_zero:
                    err, loss = at_zero[s]  # the centre is the same on every ray
                else:
                    with torch.no_grad():
                        for n, p in net.named_parameters():
                            p.copy_(base[n] + t * d[n].to(p.device))
                    err, loss = measure(net)
                    if i == 0:
                        at_zero[s] = (err, loss)
                rows.append(WidthPoint(labels[s], r, t, err, loss))
                if progress:
                    progress(len(rows), total)
    summary = [WidthSummary(label, at_zero[s][0],
                            statistics.median(row.test_error for row in rows
                                              if row.solution == label
                                              and row.distance == distances[-1]))
               for s, label in enumerate(labels)]
    if csv_path is None and plot_path:
        csv_path = os.path.splitext(plot_path)[0] + ".csv"
    if csv_path:
        with atomic_text(csv_path) as f:
            w = csv.DictWriter(f, fieldnames=[f.name for f in fields(WidthPoint)])
            w.writeheader()
            w.writerows(row.to_dict() for row in rows)
    if plot_path:
        plot_width(rows, plot_path, title=f"{chosen.data}: {labels[0]} vs {labels[1]}")
    return WidthResult(list(labels), max_distance, rows, summary, csv_path, plot_path,
                       time.perf_counter() - t0)


def plot_width(rows: list[WidthPoint], path: str, title: str = "") -> None:
    """Median and min-max band over rays of test error and train loss, per solution."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r.solution for r in rows):
        mine = [r for r in rows if r.solution == label]
        ts = sorted({r.distance for r in mine})
        for ax, key in zip(axes, ("test_error", "train_loss")):
            vals = [sorted(getattr(r, key) for r in mine if r.distance == t) for t in ts]
            med = [v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
                   for v in vals]
            line, = ax.plot(ts, med, label=f"{label} (median over rays)")
            ax.fill_between(ts, [v[0] for v in vals], [v[-1] for v in vals], alpha=0.2,
                            color=line.get_color(), label=f"{label}: min to max over rays")
    axes[0].set_ylabel("test error (%)")
    axes[1].set_ylabel("train loss")
    for ax in axes:
        ax.set_xlabel("distance along random ray")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with AtomicFile(path) as out:
        fig.savefig(out.file, dpi=120, format="png")
    plt.close(fig)
