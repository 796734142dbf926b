"""The SWA paper's Table 1 protocol with offline averaging.

Per seed: one SGD run of budget B (SGD schedule) and one SWA run of 1.5 B (SWA schedule),
saving every epoch. From the SWA run's checkpoints the running average is folded epoch by
epoch (`average --into`), BatchNorm-fixed and tested: its values at B, 1.25 B and 1.5 B are
the SWA budgets, all from one training run. The prediction ensemble of the same snapshots
(mean softmax) is reported beside them.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ckptavg import options
from ckptavg.engine.average import average
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io.atomic import AtomicFile, atomic_text
from ckptavg.nn.bn import bn_fix
from ckptavg.nn.build import network
from ckptavg.nn.data import get_dataset, make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import evaluate, predict, scores
from ckptavg.options import DataOptions, LoaderOptions, ModelOptions
from ckptavg.plots import pyplot
from ckptavg.results import MeanStd, Result, mean_std
from ckptavg.train.loop import TrainConfig, train


@dataclass(frozen=True)
class Preset:
    model: str
    data: str
    budget: int
    lr: float
    wd: float
    swa_start: int
    swa_lr: float
    batch_size: int = 128
    model_kwargs: tuple = ()
    subset: int | None = None
    holdout: int = 0
    threads: int | None = None  # torch threads per run: a seed reproduces bit for bit at one count
    paper: dict | None = None  # the paper's test accuracy (%): SGD, SWA 1, 1.25, 1.5 budgets


_C10 = {"cifar10-vgg16": ("vgg16", 200, 0.05, 5e-4, 161, 0.01, (93.25, 93.59, 93.70, 93.64)),
        "cifar10-preresnet164": ("preresnet164", 150, 0.1, 3e-4, 126, 0.01,
                                 (95.28, 95.56, 95.77, 95.83)),
        "cifar10-wrn28-10": ("wideresnet28_10", 200, 0.1, 5e-4, 161, 0.05,
                             (96.18, 96.45, 96.64, 96.79))}
_C100 = {"cifar100-vgg16": ("vgg16", 200, 0.05, 5e-4, 161, 0.01, (72.55, 73.91, 74.17, 74.27)),
         "cifar100-preresnet164": ("preresnet164", 150, 0.1, 3e-4, 126, 0.05,
                                   (78.49, 79.77, 80.18, 80.35)),
         "cifar100-wrn28-10": ("wideresnet28_10", 200, 0.1, 5e-4, 161, 0.05,
                               (80.82, 81.46, 81.91, 82.15))}
PRESETS: dict[str, Preset] = {}
for _table, _data in ((_C10, "cifar10"), (_C100, "cifar100")):
    for _name, (_m, _b, _lr, _wd, _s, _slr, _paper) in _table.items():
        PRESETS[_name] = Preset(_m, _data, _b, _lr, _wd, _s, _slr,
                                paper=dict(zip(("sgd", "swa_1", "swa_1.25", "swa_1.5"), _paper)))
# Sized for 3 seeds in under an hour on 2 CPU cores; nothing tuned on the test split.
PRESETS["fashion-mnist"] = Preset("convnet_bn", "fashion-mnist", budget=20, lr=0.1, wd=5e-4,
                                  swa_start=16, swa_lr=0.05, batch_size=128,
                                  model_kwargs=(("width", 16),), subset=25000, holdout=5000)
# The paper's regime at CPU scale (issue #16): an over-parameterised VGG-style net (0.87M
# parameters) on 5,000 training images with the crop/flip augmentation, the paper's VGG16
# rates (lr 0.05, SWA rate 0.01, weight decay 5e-4, SWA from 0.8 B), 1 torch thread per run
# so that a seed reproduces bit for bit. Set from a one-seed pilot scored on the held-out
# images only.
PRESETS["fashion-mnist-vgg"] = Preset("vgg_small", "fashion-mnist", budget=30, lr=0.05, wd=5e-4,
                                      swa_start=24, swa_lr=0.01, batch_size=128,
                                      subset=10000, holdout=5000, threads=1)
# The paper's scale on Fashion-MNIST, for a GPU (not run on the CPU machine that wrote this):
# PreResNet-110 with the paper's CIFAR-10 PreResNet budget and rates, all 60,000 training
# images less 5,000 held out.
PRESETS["fashion-mnist-preresnet110"] = Preset("preresnet110", "fashion-mnist", budget=150,
                                               lr=0.1, wd=3e-4, swa_start=126, swa_lr=0.01,
                                               batch_size=128, holdout=5000)
BUDGETS = (1.0, 1.25, 1.5)


def budget_epochs(budget: int) -> dict[float, int]:
    """The epoch at which each budget fraction ends, rounded half up (1.5 x 3 = 4.5 -> 5)."""
    return {f: math.floor(f * budget + 0.5) for f in BUDGETS}


@dataclass
class ReplicateResult(Result):
    """Every number of the protocol: per seed, and mean/std per row over seeds."""

    preset: str
    config: dict[str, Any]  # the preset as run (its fields but `paper`)
    paper: dict[str, float] | None  # row -> the paper's figure
    seeds: list[int]
    summary: dict[str, MeanStd]  # row -> over seeds
    per_seed: list[dict[str, Any]]  # per seed: its number and each row's figure
    seconds: float
    device: str
    torch: str
    files: list[str]  # results.json, results.md and (with matplotlib) curves.png
    warnings: list[str] = field(default_factory=list)
    threads: int = 0  # torch threads: same seed and same count reproduce a run bit for bit


def run_seed(p: Preset, seed: int, out: str, *, data_dir=None, device="auto", log=None) -> dict:
    """One seed of the protocol; returns every number it measured. With `p.threads`,
    training and the evaluations run on that many torch threads (restored afterwards)."""
    before = torch.get_num_threads()
    if p.threads:
        torch.set_num_threads(p.threads)
    try:
        return _run_seed(p, seed, out, data_dir, device, log or (lambda msg: None))
    finally:
        torch.set_num_threads(before)


def _run_seed(p: Preset, seed: int, out: str, data_dir, device, log) -> dict:
    common = dict(model=p.model, data=p.data, lr=p.lr, wd=p.wd, batch_size=p.batch_size,
                  seed=seed, model_kwargs=dict(p.model_kwargs), data_dir=data_dir,
                  train_images=p.subset, holdout=p.holdout, torch_threads=p.threads)
    t0 = time.perf_counter()
    log(f"seed {seed}: SGD, {p.budget} epochs")
    train(TrainConfig(epochs=p.budget, out=os.path.join(out, "sgd"), schedule="sgd",
                      **common), device=device, resume=True)
    ends = budget_epochs(p.budget)
    swa_epochs = ends[BUDGETS[-1]]
    log(f"seed {seed}: SWA schedule, {swa_epochs} epochs from swa_start {p.swa_start}")
    swa_dir = os.path.join(out, "swa")
    train(TrainConfig(epochs=swa_epochs, out=swa_dir, schedule="swa", swa_start=p.swa_start,
                      swa_lr=p.swa_lr, **common), device=device, resume=True)
    train_seconds = time.perf_counter() - t0
    # The model is the one this protocol names (trusted), never one read from a file.
    model = ModelOptions(p.model, dict(p.model_kwargs))

    sgd_rows = [json.loads(x) for x in open(os.path.join(out, "sgd", "metrics.jsonl"))]
    swa_rows = [json.loads(x) for x in open(os.path.join(swa_dir, "metrics.jsonl"))]
    running = os.path.join(out, "swa-running.safetensors")
    fixed = os.path.join(out, "swa-running-bn.safetensors")
    if os.path.exists(running):
        os.unlink(running)
    curve, ens_curve = [], []
    prob_sum, labels = None, None
    log(f"seed {seed}: running SWA average, BatchNorm fix and test per epoch")
    for epoch in range(p.swa_start, swa_epochs + 1):
        ckpt = os.path.join(swa_dir, f"epoch-{epoch:04d}.safetensors")
        if os.path.exists(running):
            average([ckpt], into=running)
        else:
            average([ckpt], running)
        shutil.copyfile(running, fixed)
        # BatchNorm sees the images the run trained on (data.train_images: holdout excluded).
        bn_fix(fixed, model=model, data=DataOptions(data_dir=data_dir),
               loader=LoaderOptions(device=device), seed=seed)
        r = evaluate(fixed, model=model, data=DataOptions(data_dir=data_dir),
                     loader=LoaderOptions(device=device))
        curve.append({"epoch": epoch, "accuracy": r.accuracy, "loss": r.loss})
        net = network(ckpt, model, DataOptions(data_dir=data_dir)).net
        probs, y = predict_test(net, p.data, data_dir, device, predict)
        labels = y
        prob_sum = probs.double() if prob_sum is None else prob_sum + probs
        s = scores((prob_sum / (epoch - p.swa_start + 1)).float(), labels)
        ens_curve.append({"epoch": epoch, "accuracy": s.accuracy, "loss": s.loss})
    at = {e["epoch"]: e for e in curve}
    ens_at = {e["epoch"]: e for e in ens_curve}
    result = {"seed": seed, "sgd": sgd_rows[-1]["test_acc"], "train_seconds": train_seconds,
              "sgd_curve": [{"epoch": r["epoch"], "accuracy": r.get("test_acc")} for r in sgd_rows],
              "swa_iterates": [{"epoch": r["epoch"], "accuracy": r.get("test_acc")} for r in swa_rows],
              "swa_curve": curve, "ensemble_curve": ens_curve,
              "val": {"sgd": sgd_rows[-1].get("val_acc"), "swa_iterate": swa_rows[-1].get("val_acc")}}
    for f, e in ends.items():
        if e < p.swa_start:
            continue
        result[f"swa_{f:g}"] = at[e]["accuracy"]
        result[f"ensemble_{f:g}"] = ens_at[e]["accuracy"]
    return result


def _run_seeds(p: Preset, seeds: list[int], out: str, data_dir, device, jobs: int,
               log) -> list[dict]:
    paths = {s: os.path.join(out, f"seed-{s}") for s in seeds}
    if jobs == 1 or len(seeds) == 1:
        return [run_seed(p, s, paths[s], data_dir=data_dir, device=device, log=log)
                for s in seeds]
    import concurrent.futures
    import multiprocessing

    # spawn: a fresh interpreter per job (no forked torch thread pools or CUDA state).
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx) as pool:
        futures = {pool.submit(run_seed, p, s, paths[s], data_dir=data_dir, device=device): s
                   for s in seeds}
        if log:
            log(f"seeds {', '.join(map(str, seeds))}: {min(jobs, len(seeds))} at a time")
        done = {}
        for f in concurrent.futures.as_completed(futures):
            done[futures[f]] = f.result()
            if log:
                log(f"seed {futures[f]}: done")
    return [done[s] for s in seeds]


_TEST_CACHE: dict = {}


def predict_test(net, data, data_dir, device, predict):
    dev = resolve_device(device)
    key = (data, data_dir)
    if key not in _TEST_CACHE:
        _TEST_CACHE[key] = make_loader(get_dataset(data, "test", data_dir), 512, device=str(dev))
    return predict(net.to(dev), _TEST_CACHE[key], dev)


def replicate(preset: str | Preset, out: str, *, seeds: int | Sequence[int] = 3,
              first_seed: int = 0, data_dir: str | None = None, device: str = options.DEVICE,
              overrides: dict | None = None, jobs: int = 1, log=None) -> ReplicateResult:
    """Run the protocol for `seeds` seeds; write results.json, results.md and curves.png.

    Args:
        preset: a name in PRESETS or a Preset.
        out: the folder for every run and the result files (runs already there resume).
        seeds: how many seeds (from `first_seed`), or the seeds themselves.
        first_seed: the first seed when `seeds` is a count.
        data_dir: where the preset's data set is (default: as for every command, see
            `DataOptions`).
        device: "auto", "cpu", "cuda" or "cuda:N" for the runs and their scoring.
        overrides: Preset fields to replace (None values are ignored; `train_images` is
            the preset's `subset`, as `--train-images` spells it); `swa_start` may be
            a fraction of the budget below 1, as `train --swa-start` takes it.
        jobs: seeds run at once, each in its own process (on CPU, with the preset's thread
            count per process: 2 jobs of 1 thread use 2 cores without their threads
            waiting for each other).
        log: called with one progress line at a time.

    Returns:
        A ReplicateResult (what results.json holds).

    Example:
        Trains for minutes (docs/results.md has the figures), so the example is not run:

        >>> replicate("fashion-mnist", "results/fmnist", seeds=1).summary["swa_1.5"].mean
        ... # doctest: +SKIP
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, PRESETS, n=2)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise CkptavgError(f"unknown preset {preset!r}; {hint}known: {', '.join(PRESETS)}")
        name, p = preset, PRESETS[preset]
    else:
        name, p = "custom", preset
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "train_images" in overrides:  # the option's name for the preset's field
        overrides["subset"] = overrides.pop("train_images")
    if overrides.get("model", p.model) != p.model and "model_kwargs" not in overrides:
        overrides["model_kwargs"] = ()  # the preset's kwargs belong to the preset's model
    start = overrides.get("swa_start")
    if start is not None and 0 < start < 1:  # a fraction of the budget, as train takes it
        overrides["swa_start"] = max(1, round(start * overrides.get("budget", p.budget)))
    elif start is not None:
        if float(start) != int(start):
            raise OptionError("swa_start", "an epoch (a whole number) or a fraction of the "
                              "budget below 1", start)
        overrides["swa_start"] = int(start)
    p = replace(p, **overrides)
    if not 1 <= p.swa_start <= p.budget:
        raise OptionError(("swa_start", "budget"), f"the SWA start {p.swa_start} must be within the budget {p.budget}")
    seed_list = list(range(first_seed, first_seed + seeds)) if isinstance(seeds, int) \
        else [int(x) for x in seeds]
    if not seed_list:
        raise OptionError("seeds", "run at least one", seeds)
    if len(set(seed_list)) < len(seed_list):
        raise OptionError("seed_list", "each seed once", seed_list)
    if jobs < 1:
        raise OptionError("jobs", "must be 1 or more", jobs)
    ends = list(budget_epochs(p.budget).values())
    if len(set(ends)) < len(ends):
        raise OptionError("budget", f"the 1, 1.25 and 1.5 budget rows would end at epochs "
                          f"{ends}, not three different epochs; use a budget of 4 or more",
                          p.budget)
    os.makedirs(out, exist_ok=True)
    warnings = []
    try:
        pyplot()
    except CkptavgError as e:  # the numbers still stand without the plot: say so now
        warnings.append(f"{e}; curves.png will not be drawn")
        if log:
            log(warnings[-1])
    t0 = time.perf_counter()
    per_seed = _run_seeds(p, seed_list, out, data_dir, device, jobs, log)
    rows = ["sgd"] + [f"swa_{f:g}" for f in BUDGETS] + [f"ensemble_{f:g}" for f in BUDGETS]
    summary = {r: mean_std([s[r] for s in per_seed]) for r in rows if r in per_seed[0]}
    config = {k: v for k, v in asdict(p).items() if k != "paper"}
    config["model_kwargs"] = dict(p.model_kwargs)
    result = ReplicateResult(
        name, config, p.paper, [s["seed"] for s in per_seed], summary, per_seed,
        time.perf_counter() - t0,
        torch.cuda.get_device_name() if resolve_device(device).type == "cuda" else "cpu",
        torch.__version__, [os.path.join(out, "results.json"), os.path.join(out, "results.md")],
        warnings, p.threads or torch.get_num_threads())
    with atomic_text(result.files[0]) as f:
        json.dump(result.to_dict(), f, indent=2)
    with atomic_text(result.files[1]) as f:
        f.write(results_table(result))
    if not warnings:
        plot_curves(result, os.path.join(out, "curves.png"))
        result.files.append(os.path.join(out, "curves.png"))
    return result


def results_table(result: ReplicateResult) -> str:
    """The Markdown table of results.md."""
    p = result.config
    over = (f"seed {result.seeds[0]} (one seed: no spread)" if len(result.seeds) == 1
            else f"mean ± std over seeds {', '.join(map(str, result.seeds))}")
    lines = [f"# {result.preset}: test accuracy (%), {over}", "",
             f"{p['model']} on {p['data']}, budget B = {p['budget']} epochs, lr {p['lr']}, "
             f"wd {p['wd']}, SWA from epoch {p['swa_start']} at lr {p['swa_lr']}"
             + (f", first {p['subset']} training images ({p['holdout']} held out)"
                if p.get("subset") else ""), "",
             "| method | ours | paper |", "|---|---|---|"]
    names = {"sgd": "SGD (B)", "swa_1": "SWA 1 budget", "swa_1.25": "SWA 1.25 budgets",
             "swa_1.5": "SWA 1.5 budgets", "ensemble_1": "ensemble of SWA snapshots, 1 budget",
             "ensemble_1.25": "ensemble, 1.25 budgets", "ensemble_1.5": "ensemble, 1.5 budgets"}
    paper = result.paper or {}
    for key, s in result.summary.items():
        ref = f"{paper[key]:.2f}" if key in paper else "-"
        spread = f" ± {s.std:.2f}" if len(result.seeds) > 1 else ""
        lines.append(f"| {names.get(key, key)} | {s.mean:.2f}{spread} | {ref} |")
    lines += ["", "Per seed:", "", "| seed | " + " | ".join(result.summary) + " |",
              "|---|" + "---|" * len(result.summary)]
    for s in result.per_seed:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{s[k]:.2f}" for k in result.summary) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: ReplicateResult, path: str) -> None:
    """Test error per epoch: SGD, the SWA run's iterates, the running SWA average (mean of seeds)."""
    plt = pyplot()

    def mean_curve(key):
        by_epoch: dict[int, list] = {}
        for s in result.per_seed:
            for r in s[key]:
                if r["accuracy"] is not None:
                    by_epoch.setdefault(r["epoch"], []).append(100 - r["accuracy"])
        es = sorted(by_epoch)
        return es, [statistics.fmean(by_epoch[e]) for e in es]

    fig, ax = plt.subplots(figsize=(7, 4))
    shown = []
    for key, label, style in (("sgd_curve", "SGD (SGD schedule)", "-"),
                              ("swa_iterates", "SWA run: individual weights", "--"),
                              ("swa_curve", "SWA: running average, BN fixed", "-"),
                              ("ensemble_curve", "ensemble of the same snapshots", ":")):
        es, errs = mean_curve(key)
        ax.plot(es, errs, style, label=label)
        shown += errs
    for f, e in budget_epochs(result.config["budget"]).items():
        ax.axvline(e, color="grey", lw=0.5)
        ax.annotate(f"{f:g} B", (e, 1), xycoords=("data", "axes fraction"), fontsize=8,
                    ha="center", va="bottom", color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    # Every curve in view, but not the first epochs' errors that would flatten the rest.
    lo, hi = min(shown), sorted(shown)[int(0.95 * (len(shown) - 1))]
    ax.set_ylim(max(0.0, lo - 0.5), hi + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    seeds = result.seeds
    ax.set_title(f"{result.preset}: " + (f"seed {seeds[0]}" if len(seeds) == 1
                                         else f"mean over seeds {', '.join(map(str, seeds))}"),
                 pad=14)
    fig.tight_layout()
    with AtomicFile(path) as out:
        fig.savefig(out.file, dpi=120, format="png")
    plt.close(fig)
