"""What SWA's gain over SGD depends on: one preset, one factor changed at a time, scored on
the held-out images only (the test split is never read).

Per variant: the SGD run (budget B) and the SWA run (1.5 B) of `replicate`'s protocol; the
SWA average over [swa_start, end] at 1, 1.25 and 1.5 B with BatchNorm recalibrated, the SGD
run's final weights with their own statistics, all on the preset's held-out images. A
variant that only changes the SWA rate reuses the baseline's SGD run.

    ckptavg ablation -o OUT --data-dir DIR [--seed 1]
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ckptavg.engine.select import close_all, open_candidates
from ckptavg.errors import OptionError
from ckptavg.experiments.replicate import BUDGETS, PRESETS, Preset, budget_epochs
from ckptavg.io.atomic import atomic_text
from ckptavg.options import DataOptions, HeldOutOptions, LoaderOptions, ModelOptions
from ckptavg.results import Result
from ckptavg.selection.heldout import HeldOut, RunningSum
from ckptavg.train.loop import TrainConfig, train

# name -> Preset fields changed from fashion-mnist-vgg
VARIANTS = {
    "baseline": {},
    "swa_lr 0.03": {"swa_lr": 0.03},
    "2,000 training images": {"subset": 7000},
    "width 16 (0.42M parameters)": {"model_kwargs": (("width", 16),)},
}


def _runs(p: Preset, seed: int, folder: str, sgd_folder: str | None, data_dir) -> tuple[str, str]:
    common = dict(model=p.model, data=p.data, lr=p.lr, wd=p.wd, batch_size=p.batch_size,
                  seed=seed, model_kwargs=dict(p.model_kwargs), data_dir=data_dir,
                  train_images=p.subset, holdout=p.holdout, torch_threads=p.threads,
                  eval_every=0)
    sgd = sgd_folder or os.path.join(folder, "sgd")
    if sgd_folder is None:
        train(TrainConfig(epochs=p.budget, out=sgd, schedule="sgd", **common), device="cpu",
              resume=True)
    swa = os.path.join(folder, "swa")
    train(TrainConfig(epochs=budget_epochs(p.budget)[BUDGETS[-1]], out=swa, schedule="swa",
                      swa_start=p.swa_start, swa_lr=p.swa_lr, **common), device="cpu",
          resume=True)
    return sgd, swa


def ablate_variant(p: Preset, seed: int, folder: str, sgd_folder: str | None,
                   data_dir: str | None) -> dict:
    """Held-out accuracy of SGD (B) and of SWA at 1, 1.25 and 1.5 B for one variant."""
    t0 = time.perf_counter()
    sgd, swa = _runs(p, seed, folder, sgd_folder, data_dir)
    ends = budget_epochs(p.budget)
    paths = [os.path.join(swa, f"epoch-{e:04d}.safetensors")
             for e in range(p.swa_start, ends[BUDGETS[-1]] + 1)]
    sgd_last = os.path.join(sgd, f"epoch-{p.budget:04d}.safetensors")
    cands = open_candidates([sgd_last] + paths)
    try:
        held = HeldOut(cands[1], model=ModelOptions(p.model, dict(p.model_kwargs)),
                       data=DataOptions(data_dir=data_dir), loader=LoaderOptions(device="cpu"),
                       heldout=HeldOutOptions(seed=seed))
        row = {"sgd": held.score(RunningSum.read(cands[0].reader), sgd_last,
                                 recalibrate=False).accuracy}
        total = RunningSum()
        for i, c in enumerate(cands[1:]):
            total.add(RunningSum.read(c.reader), i)
            epoch = p.swa_start + i
            for f, e in ends.items():
                if e == epoch:
                    row[f"swa_{f:g}"] = held.score(total.mean(), c.path).accuracy
    finally:
        close_all(cands)
    row["swa_1.5_minus_sgd"] = row["swa_1.5"] - row["sgd"]
    row["train_acc"] = json.loads(open(os.path.join(sgd, "metrics.jsonl")).readlines()[-1])[
        "train_acc"]
    row["seconds"] = time.perf_counter() - t0
    return row


@dataclass
class AblationResult(Result):
    """Per variant: its change to the preset and the held-out accuracies of SGD and SWA."""

    preset: str
    seed: int
    # variant -> its change to the preset ("change") and its held-out accuracies (%) by row
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)


def ablate(out: str, *, preset: str = "fashion-mnist-vgg", seed: int = 1,
           data_dir: str | None = None, variants: dict | None = None) -> AblationResult:
    """Every variant of VARIANTS (or `variants`); writes OUT/ablation.json after each."""
    if preset not in PRESETS:
        raise OptionError("preset", f"use one of {', '.join(PRESETS)}", repr(preset))
    base = PRESETS[preset]
    result = AblationResult(preset, seed)
    if base.threads:
        torch.set_num_threads(base.threads)
    for name, change in (variants or VARIANTS).items():
        p = replace(base, **change)
        folder = os.path.join(out, name.split(" (")[0].replace(" ", "-").replace(",", ""))
        only_swa = set(change) <= {"swa_lr", "swa_start"} and change
        sgd = os.path.join(out, "baseline", "sgd") if only_swa else None
        result.variants[name] = {"change": {k: v if not isinstance(v, tuple) else dict(v)
                                               for k, v in change.items()},
                                    **ablate_variant(p, seed, folder, sgd, data_dir)}
        with atomic_text(os.path.join(out, "ablation.json")) as f:
            json.dump(result.to_dict(), f, indent=2)
    return result
