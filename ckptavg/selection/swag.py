"""SWAG (Maddox et al. 2019) from saved checkpoints: a Gaussian over weights, offline.

`swag` streams a run's snapshots tensor by tensor (as `average` does): the float64 mean and
second moment of every floating tensor give the SWA mean and a diagonal variance (clamped
at a small positive floor, as the authors' code does), and the last K snapshots minus the
final mean give the rank-K deviation matrix. Memory: a few tensors times K, never the model
times N. The output is an ordinary checkpoint (one .safetensors file or a sharded folder)
whose keys are `mean.<key>`, `var.<key>` and `dev.<key>` (shape [K, ...]).

`evaluate_swag` draws weights tensor by tensor,
`mean + sqrt(scale) * (sqrt(var) * z1 + dev^T z2 / sqrt(K - 1))` with one z2 ~ N(0, I_K) per
sample shared by all tensors (`diag`: without the low-rank term), recalibrates BatchNorm
for each sample, and averages the softmax outputs (Bayesian model averaging).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ckptavg import options
from ckptavg.engine.plan import make_plan
from ckptavg.engine.prepare import protected_files
from ckptavg.engine.select import close_all, leave_out_outputs, open_candidates, select
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io import TensorSpec, make_writer, open_checkpoint
from ckptavg.io.atomic import AtomicFile
from ckptavg.io.base import ReaderBase
from ckptavg.io.checkpoint import load
from ckptavg.io.writer import output_kind
from ckptavg.nn.bn import bn_layers, recalibrate
from ckptavg.nn.build import load_weights, network_for
from ckptavg.nn.calibration import BINS, ReliabilityBin, calibration_scores
from ckptavg.nn.data import eval_split, make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import predict
from ckptavg.options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
    Split,
    Stats,
    check_choice,
)
from ckptavg.plots import pyplot
from ckptavg.results import Progress, Result, peak_rss_bytes
from ckptavg.selection.heldout import refuse_quantized

VAR_CLAMP = 1e-30  # the authors' floor for the diagonal variance
PARTS = ("mean.", "var.", "dev.")


@dataclass
class SwagResult(Result):
    """What `swag` wrote: the snapshots it used and the deviation snapshots among them."""

    inputs: list[str]
    deviations: list[str]  # the last `rank` inputs, whose deviations from the mean are kept
    output: str
    n: int
    rank: int
    tensors: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    warnings: list[str] = field(default_factory=list)


def swag(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, rank: int = options.SWAG_RANK,
         var_clamp: float = VAR_CLAMP, selection: Selection | None = None,
         reading: Reading | None = None, shard_size: int | None = None, progress: Progress | None = None) -> SwagResult:
    """Fit SWAG's mean, diagonal variance and rank-K deviations from checkpoints, streaming.

    Args:
        inputs: one run's snapshots (paths or globs), ordered by epoch as for `average`.
        output: a .safetensors file or a folder (sharded); written atomically.
        shard_size: with a folder output, shards of at most this many bytes.
        rank: K, the number of last snapshots kept as deviations (at least 2; fewer inputs
            than K: all of them, with a warning).
        var_clamp: floor of the diagonal variance.
        selection, reading: as for `average`.
        progress: called with (tensors done, tensors in all).

    Returns:
        A SwagResult.

    Example:
        >>> r = ckptavg.swag(["runs/a/epoch-*.safetensors"], "swag.safetensors", rank=3,
        ...                  selection=ckptavg.Selection(from_epoch=2))
        >>> r.n, r.rank, len(r.deviations)
        (5, 3, 3)
    """
    t0 = time.perf_counter()
    output = os.fspath(output)
    if rank < 2:
        raise OptionError("rank", "SWAG's low-rank part needs 2 or more", rank)
    if not var_clamp > 0:
        raise OptionError("var_clamp", "must be more than 0", var_clamp)
    if output_kind(output, shard_size) == "torch":  # a torch file holds everything until saved
        raise OptionError("output", "a SWAG output is a .safetensors file or a folder, "
                          "written tensor by tensor", output)
    reading = Reading.of(reading)
    cands = open_candidates([os.fspath(p) for p in inputs], reading.key, reading.strip_prefix)
    try:
        kept, warnings = leave_out_outputs(cands)
        chosen = select(kept, selection)
        readers = [c.reader for c in chosen]
        n = len(readers)
        if n < 2:
            raise CkptavgError(f"{n} snapshot selected: SWAG needs 2 or more (widen the selection)")
        k = min(rank, n)
        if k < rank:
            warnings.append(f"rank {rank} asked for, but only {n} snapshots: rank {k}")
        plan = make_plan(readers, [1.0] * n)
        refuse_quantized(plan, readers[-1].path, "SWAG's moments")
        specs = []
        for s in plan.specs:
            info = readers[0].info(s.key)
            if not info.dtype.is_floating_point:
                specs.append(TensorSpec("mean." + s.key, s.shape, s.dtype))
                continue
            dt = torch.float64 if info.dtype == torch.float64 else torch.float32
            specs += [TensorSpec("mean." + s.key, s.shape, dt), TensorSpec("var." + s.key, s.shape, dt),
                      TensorSpec("dev." + s.key, (k, *s.shape), dt)]
        meta = {**plan.metadata, "swag.n": str(n), "swag.rank": str(k), "swag.var_clamp": repr(var_clamp),
                "swag.deviations": json.dumps([os.path.basename(r.path.rstrip(os.sep))
                                               for r in readers[-k:]])}
        # as `average`: no input's file, but an earlier output of ours at this path
        with make_writer(output, specs, meta, shard_size,
                         inputs=protected_files(cands, kept, [output])) as writer:
            for i, s in enumerate(plan.specs):
                _write_moments(writer, readers, s.key, k, var_clamp)
                if progress:
                    progress(i + 1, len(plan.specs))
            for r in readers:
                r.check_unchanged()
        result = SwagResult([c.path for c in chosen], [c.path for c in chosen[-k:]], output, n,
                            k, len(specs), sum(s.nbytes for s in specs), 0.0, 0, warnings)
    finally:
        close_all(cands)
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _write_moments(writer, readers: list[ReaderBase], key: str, k: int, var_clamp: float) -> None:
    """mean., var. and dev. of one tensor; integers keep the newest input's value."""
    last = readers[-1]
    if not last.info(key).dtype.is_floating_point:
        writer.write("mean." + key, last.read(key).clone())
        last.release(key)
        return
    s1 = s2 = None
    for r in readers:
        x = r.read(key).to(torch.float64)
        r.release(key)
        if s1 is None:
            s1, s2 = x.clone(), x * x
        else:
            s1.add_(x)
            s2.addcmul_(x, x)
    n = len(readers)
    mean = s1.div_(n)
    var = s2.div_(n).sub_(mean * mean).clamp_min_(var_clamp)
    dt = torch.float64 if last.info(key).dtype == torch.float64 else torch.float32
    writer.write("mean." + key, mean.to(dt))
    writer.write("var." + key, var.to(dt))
    del var
    dev = torch.empty((k, *mean.shape), dtype=dt)
    for j, r in enumerate(readers[-k:]):
        dev[j] = r.read(key).to(torch.float64) - mean
        r.release(key)
    writer.write("dev." + key, dev)


class SwagPosterior:
    """An open SWAG file: its keys, rank, and weight samples drawn tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.reader = open_checkpoint(self.path)
        meta = self.reader.metadata()
        if "swag.rank" not in meta:
            self.reader.close()
            raise CkptavgError(f"{self.path}: not a SWAG file (no swag.rank metadata); write one "
                               "with ckptavg swag")
        self.metadata = meta
        self.rank = int(meta["swag.rank"])
        self.keys = [k[len("mean."):] for k in self.reader.keys() if k.startswith("mean.")]

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def mean(self) -> dict[str, torch.Tensor]:
        """The SWA mean (what every sample with scale 0 equals)."""
        return {k: self.reader.read("mean." + k).clone() for k in self.keys}

    def sample(self, scale: float, diag: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One weight sample. z2 (K values) is drawn first, then z1 per tensor in key order."""
        if scale < 0:
            raise OptionError("scale", "must be 0 or more", scale)
        z2 = torch.randn(self.rank, generator=generator, dtype=torch.float64)
        root = math.sqrt(scale)
        out = {}
        for k in self.keys:
            mean = self.reader.read("mean." + k)
            if not mean.dtype.is_floating_point or scale == 0:
                out[k] = mean.clone()
                continue
            z1 = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
            noise = self.reader.read("var." + k).to(torch.float64).sqrt_().mul_(z1)
            if not diag:
                dev = self.reader.read("dev." + k).to(torch.float64)
                noise += torch.tensordot(z2, dev, dims=1) / math.sqrt(self.rank - 1)
            out[k] = (mean.to(torch.float64) + root * noise).to(mean.dtype)
            for part in PARTS if not diag else PARTS[:2]:
                self.reader.release(part + k)
        return out


@dataclass
class CalibrationRow(Result):
    """Accuracy (%), NLL and ECE of one predictor, with its reliability bins."""

    name: str
    accuracy: float
    nll: float
    ece: float
    samples: int
    reliability: list[ReliabilityBin]


@dataclass
class SwagEvalResult(Result):
    """SWAG's Bayesian model average beside the SWA mean and any baselines given."""

    swag: str
    data: str
    split: str
    samples: int
    scale: float
    diag: bool
    seed: int
    rows: list[CalibrationRow]
    bins: int
    device: str
    seconds: float
    plot: str | None = None
    warnings: list[str] = field(default_factory=list)


def evaluate_swag(swag_path: str | os.PathLike, baselines: Sequence[str | os.PathLike] = (), *,
                  samples: int = options.SWAG_SAMPLES, scale: float = options.SWAG_SCALE, diag: bool = False,
                  model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
                  loader: LoaderOptions | None = None, split: Split | None = None,
                  eval_images: int | None = None, seed: int = options.SEED,
                  stats: Stats = options.STATS,
                  bn_batches: int | None = None, plot: str | os.PathLike | None = None,
                  progress: Progress | None = None) -> SwagEvalResult:
    """Accuracy, NLL and ECE of SWAG (mean softmax of `samples` weight draws), the SWA mean,
    and each baseline checkpoint (e.g. the final SGD weights), on one split.

    Args:
        swag_path: a file written by `swag`.
        baselines: other checkpoints to score the same way (their BatchNorm is recalibrated
            only when their metadata says it is stale).
        samples, scale, diag: the draws; `diag` drops the low-rank part (SWAG-diagonal).
        model, data, loader: as for `evaluate` (default: the SWAG file's metadata).
        split, eval_images: the split scored (default: test) and only its first N images.
        seed: sample i draws from a generator seeded with (seed, i); the BatchNorm pass of
            every draw uses the same seed, so a run is reproducible.
        stats, bn_batches: the BatchNorm recalibration of every draw and of the mean, on the
            training images the run used (data.train_images metadata), augmented.
        plot: write a reliability diagram (PNG) of every row.
        progress: called with (passes done, passes in all).

    Returns:
        A SwagEvalResult: rows "SWAG" (or "SWAG-diagonal"), "SWA", then the baselines.

    Example:
        >>> r = ckptavg.evaluate_swag("swag.safetensors", ["runs/a/epoch-0006.safetensors"],
        ...                           samples=2, bn_batches=1, eval_images=300)
        >>> [row.name for row in r.rows], r.rows[0].samples
        (['SWAG', 'SWA', 'runs/a/epoch-0006.safetensors'], 300)
    """
    t0 = time.perf_counter()
    ld = LoaderOptions.of(loader)
    batch_size, workers, input_key = ld.batch_size, ld.workers, ld.input_key
    if split is not None:
        check_choice("split", split, Split)
    check_choice("stats", stats, Stats)
    if samples < 1:
        raise OptionError("samples", "must be 1 or more", samples)
    if plot is not None:
        pyplot()
    with SwagPosterior(swag_path) as post:
        meta = post.metadata
        built = network_for(meta, post.path, model, data)
        net, data_name = built.net, built.data
        split = eval_split(data_name, split)
        dev = resolve_device(ld.device)
        net.to(dev)
        has_bn = bool(bn_layers(net))
        train_images = meta.get("data.train_images", "")
        bn_subset = int(train_images) if train_images.isdigit() and \
            meta.get("data.name") == data_name else None
        train_set = built.dataset("train", augment=True) \
            if has_bn else None
        eval_set = built.dataset(split)
        eval_loader = make_loader(eval_set, batch_size, workers=workers, subset=eval_images,
                                  device=str(dev), subset_option="eval_images")
        total = samples + 1 + len(baselines)
        done = 0

        def run(state: dict, name: str, fix: bool) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal done
            load_weights(net, state, name)
            if fix and has_bn:
                torch.manual_seed(seed)
                loader = make_loader(train_set, batch_size, shuffle=True, workers=workers,
                                     seed=seed, subset=bn_subset, device=str(dev))
                recalibrate(net, loader, stats=stats, device=dev, max_batches=bn_batches,
                            input_key=input_key)
            out = predict(net, eval_loader, dev, input_key)
            done += 1
            if progress:
                progress(done, total)
            return out

        probs_sum, labels = None, None
        for i in range(samples):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            probs, labels = run(post.sample(scale, diag, g), f"SWAG sample {i}", True)
            probs_sum = probs.double() if probs_sum is None else probs_sum.add_(probs)
        rows = [_row("SWAG-diagonal" if diag else "SWAG", probs_sum / samples, labels)]
        probs, labels = run(post.mean(), "the SWA mean", True)
        rows.append(_row("SWA", probs, labels))
    warnings = []
    for b in baselines:
        b = os.fspath(b)
        state, bmeta = load(b)
        probs, labels = run(state, b, bmeta.get("bn.stale") == "true")
        rows.append(_row(b, probs, labels))
    result = SwagEvalResult(os.fspath(swag_path), data_name, split, samples, scale, diag, seed,
                            rows, BINS, str(dev), time.perf_counter() - t0, warnings=warnings)
    if plot is not None:
        result.plot = os.fspath(plot)
        plot_reliability(rows, result.plot)
    return result


def _row(name: str, probs: torch.Tensor, labels: torch.Tensor) -> CalibrationRow:
    s = calibration_scores(probs, labels)
    return CalibrationRow(name, s.accuracy, s.nll, s.ece, s.samples, s.reliability)


def plot_reliability(rows: Sequence[CalibrationRow], path: str, title: str = "",
                     min_count: int = 1) -> None:
    """Reliability diagram: accuracy minus confidence per confidence bin, one line per row
    (the SWAG paper's presentation: 0 is perfect calibration, below 0 over-confidence);
    bins with fewer than `min_count` samples are left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        pts = [(b.confidence, b.accuracy - b.confidence) for b in row.reliability
               if b.count >= max(1, min_count)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"{os.path.basename(row.name)} (ECE {row.ece:.3f})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("confidence (top class probability)")
    ax.set_ylabel("accuracy - confidence")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with AtomicFile(path) as out:
        fig.savefig(out.file, dpi=120, format="png")
    plt.close(fig)
