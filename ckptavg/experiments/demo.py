"""`ckptavg demo`: the whole SWA pipeline on real data the package ships, in minutes on a CPU.

Trains a small BatchNorm convnet on 6,000 Fashion-MNIST images with the SWA schedule,
saving a checkpoint per epoch; averages the SWA phase offline; recalibrates BatchNorm;
evaluates on 2,000 test images the run's last iterate, the SWA average, and an SGD baseline:
the same network, seed and budget trained with the paper's SGD schedule (decaying rate).

The last iterate is the SWA run's own final weights, taken at the constant SWA rate: it shows
what averaging adds to the weights it averages. The SGD baseline is the paper's comparison
(at one seed and this small scale; `ckptavg replicate` runs it over seeds).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources

from ckptavg import options
from ckptavg.engine.average import average
from ckptavg.errors import OptionError
from ckptavg.nn.bn import bn_fix
from ckptavg.nn.evaluation import EvalResult, evaluate
from ckptavg.options import DataOptions, LoaderOptions, Selection
from ckptavg.results import Result
from ckptavg.train.loop import TrainConfig, train

DEMO = {"model": "convnet_bn", "model_kwargs": {"width": 16}, "epochs": 32, "swa_start": 20,
        "lr": 0.1, "swa_lr": 0.05, "wd": 5e-4, "batch_size": 64, "seed": 0}


@dataclass
class DemoResult(Result):
    out: str | None  # None: the files were in a temporary folder, now removed
    epochs: int
    swa_start: int
    averaged: int
    bn_samples: int
    last_iterate: EvalResult  # the run's final weights, at the SWA rate
    swa: EvalResult  # the average of epochs swa_start..epochs, BatchNorm recalibrated
    train_seconds: float
    sgd: EvalResult | None = None  # the SGD schedule's final weights, same budget and seed


def demo_data_dir() -> str:
    return str(resources.files("ckptavg") / "assets" / "fashion-mnist-subset")


def run_demo(out: str | None = None, *, device: str = options.DEVICE, epochs: int | None = None,
             on_stage: Callable[[str], None] | None = None, on_batch=None,
             on_epoch=None, on_step=None, sgd: bool = True) -> DemoResult:
    """Train, average, fix BatchNorm, evaluate.

    Args:
        out: keep the run's files in this (new or empty) folder; default a temporary one.
        device: "auto", "cpu", "cuda" or "cuda:N".
        epochs: override the demo's 32 epochs (2 or more; SWA starts at 5/8 of them).
        on_stage, on_batch, on_epoch, on_step: progress callbacks (on_step as train's
            on_stage).
        sgd: also train the SGD baseline (the same budget with the SGD schedule).

    Returns:
        A DemoResult with the test scores of the last iterate, the SWA average and the SGD
        baseline.

    Example:
        Trains for a minute, so the example is not run:

        >>> run_demo(epochs=4).swa.accuracy  # doctest: +SKIP
    """
    e = DEMO["epochs"] if epochs is None else epochs
    if e < 2:
        raise OptionError("epochs", "the demo needs 2 or more", e)
    stage = on_stage or (lambda s: None)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckptavg-demo-")
        out = tmp.name
    try:
        data_dir = demo_data_dir()
        swa_start = max(1, round(e * DEMO["swa_start"] / DEMO["epochs"]))
        cfg = TrainConfig(model=DEMO["model"], model_kwargs=DEMO["model_kwargs"],
                          data="fashion-mnist", data_dir=data_dir, epochs=e,
                          out=os.path.join(out, "run"), schedule="swa", lr=DEMO["lr"],
                          swa_start=swa_start, swa_lr=DEMO["swa_lr"], wd=DEMO["wd"],
                          batch_size=DEMO["batch_size"], seed=DEMO["seed"])
        stage(f"training {cfg.model} on {data_dir} for {e} epochs (SWA from epoch {swa_start})")
        run = train(cfg, device=device, on_batch=on_batch, on_epoch=on_epoch, on_stage=on_step)
        swa_path = os.path.join(out, "swa.safetensors")
        stage(f"averaging epochs {swa_start}..{e}")
        avg = average(run.checkpoints, swa_path, selection=Selection(from_epoch=swa_start))
        stage("recalibrating BatchNorm on the training images")
        where = dict(data=DataOptions(data_dir=data_dir), loader=LoaderOptions(device=device))
        bn = bn_fix(swa_path, **where)
        stage("evaluating on the test images")
        last = evaluate(run.checkpoints[-1], **where)
        swa = evaluate(swa_path, **where)
        base = None
        seconds = run.epoch_seconds
        if sgd:
            stage(f"training the SGD baseline: {e} epochs with the SGD schedule")
            sgd_cfg = replace(cfg, out=os.path.join(out, "sgd"), schedule="sgd", swa_start=None,
                              swa_lr=None)
            sgd_run = train(sgd_cfg, device=device, on_batch=on_batch, on_epoch=on_epoch,
                            on_stage=on_step)
            base = evaluate(sgd_run.checkpoints[-1], **where)
            seconds += sgd_run.epoch_seconds
        return DemoResult(out if tmp is None else None, e, swa_start, avg.n, bn.samples, last,
                          swa, seconds, base)
    finally:
        if tmp is not None:
            tmp.cleanup()
