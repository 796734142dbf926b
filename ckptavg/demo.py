"""`ckptavg demo`: the whole SWA pipeline on real data the package ships, in minutes on a CPU.

Trains a small BatchNorm convnet on 6,000 Fashion-MNIST images with the SWA schedule,
saving a checkpoint per epoch; averages the SWA phase offline; recalibrates BatchNorm;
evaluates the final SGD weights and the SWA average on 2,000 test images.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from importlib import resources

DEMO = {"model": "convnet_bn", "model_kwargs": {"width": 16}, "epochs": 32, "swa_start": 20,
        "lr": 0.1, "swa_lr": 0.05, "wd": 5e-4, "batch_size": 64, "seed": 0}


def demo_data_dir() -> str:
    return str(resources.files("ckptavg") / "assets" / "fashion-mnist-subset")


def run_demo(out: str | None = None, *, device: str = "auto", epochs: int | None = None,
             on_stage: Callable[[str], None] | None = None, on_batch=None, on_epoch=None) -> dict:
    """Train, average, fix BatchNorm, evaluate; returns the SGD and SWA test accuracies."""
    from ckptavg.averaging import average
    from ckptavg.bn import bn_fix
    from ckptavg.evaluation import evaluate
    from ckptavg.train.loop import TrainConfig, train

    stage = on_stage or (lambda s: None)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ckptavg-demo-")
        out = tmp.name
    try:
        data_dir = demo_data_dir()
        e = epochs or DEMO["epochs"]
        swa_start = max(1, round(e * DEMO["swa_start"] / DEMO["epochs"]))
        run_dir = os.path.join(out, "run")
        cfg = TrainConfig(model=DEMO["model"], model_kwargs=DEMO["model_kwargs"],
                          data="fashion-mnist", data_dir=data_dir, epochs=e, out=run_dir,
                          schedule="swa", lr=DEMO["lr"], swa_start=swa_start,
                          swa_lr=DEMO["swa_lr"], wd=DEMO["wd"], batch_size=DEMO["batch_size"],
                          seed=DEMO["seed"])
        stage(f"training {cfg.model} on {data_dir} for {e} epochs (SWA from epoch {swa_start})")
        summary = train(cfg, device=device, on_batch=on_batch, on_epoch=on_epoch)
        swa_path = os.path.join(out, "swa.safetensors")
        stage(f"averaging epochs {swa_start}..{e}")
        avg = average(summary["checkpoints"], swa_path, from_epoch=swa_start)
        stage("recalibrating BatchNorm on the training images")
        bn = bn_fix(swa_path, data_dir=data_dir, device=device)
        stage("evaluating on the test images")
        last = summary["checkpoints"][-1]
        sgd = evaluate(last, data_dir=data_dir, device=device)
        swa = evaluate(swa_path, data_dir=data_dir, device=device)
        return {"out": out if tmp is None else None, "epochs": e, "swa_start": swa_start,
                "averaged": avg.n, "bn_samples": bn["samples"],
                "sgd": {"checkpoint": os.path.basename(last), "accuracy": sgd["accuracy"],
                        "loss": sgd["loss"]},
                "swa": {"accuracy": swa["accuracy"], "loss": swa["loss"]},
                "test_samples": swa["samples"], "train_seconds": summary["epoch_seconds"]}
    finally:
        if tmp is not None:
            tmp.cleanup()
