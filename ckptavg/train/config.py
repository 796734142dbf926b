"""What defines a training run: `TrainConfig` (torch-free, so `ckptavg train --help` is built
from its fields: each field's default is declared here, and its flag here too unless other
commands take it: then it is the options class's (options.same), declared there once)."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, replace

from ckptavg import options
from ckptavg.errors import OptionError
from ckptavg.options import (
    Anneal,
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    SaveWhat,
    Schedule,
    check_choice,
    opt,
    same,
)


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in last.pt so --resume continues it)."""

    # Flags that other commands take too are declared once, in options.py (`same`); the
    # help says here what each means for a run where that differs.
    model: str = same(ModelOptions, "model", MISSING)
    data: str = same(DataOptions, "data", MISSING)
    epochs: int = opt(MISSING, "--epochs", kind="int", min=1, help="Training budget in epochs.")
    out: str = opt(MISSING, "-o", "--output", deprecated=("--out",), help="Run folder (new or "
                   "empty, or with --resume): epoch-NNNN.safetensors, last.pt, metrics.jsonl.")
    schedule: Schedule = opt("swa", "--schedule", kind="choice", choices=Schedule,
                             help="sgd: the paper's SGD decay; swa: SGD, then the SWA rate.")
    lr: float = opt(0.05, "--lr", kind="float", help="Initial rate (alpha1 with --cycle).")
    swa_start: int | float | None = opt(None, "--swa-start", kind="float", min=0, min_open=True,
                                        help="Epoch from which the SWA phase starts, or a "
                                        "fraction of --epochs below 1 (swa schedule; default "
                                        "0.75).")
    swa_lr: float | None = opt(None, "--swa-lr", kind="float", help="SWA rate (alpha2 with "
                               "--cycle; default half of --lr).")
    wd: float = opt(5e-4, "--wd", kind="float", help="Weight decay.")
    momentum: float = opt(0.9, "--momentum", kind="float", help="SGD momentum.")
    batch_size: int = same(LoaderOptions, "batch_size", options.TRAIN_BATCH_SIZE)
    seed: int = same(HeldOutOptions, "seed", options.SEED, help="Seed of the run.")
    cycle: int | None = opt(None, "--cycle", kind="int", help="Cyclical SWA rate: cycles of C "
                            "epochs from --swa-start.")
    save: SaveWhat = opt("epoch", "--save", kind="choice", choices=SaveWhat,
                         help="Which weights-only checkpoints to write.")
    train_images: int | None = same(HeldOutOptions, "train_images", None,
                                    help="Use only the first N training images.")
    holdout: int = same(HeldOutOptions, "holdout", 0, help="Hold out the last N of the "
                        "training images for validation.")
    eval_every: int = opt(1, "--eval-every", kind="int", min=0, help="Score the test set every "
                          "N epochs and after the last one (0: never).")
    model_kwargs: dict = same(ModelOptions, "model_kwargs", None, factory=dict)
    data_dir: str | None = same(DataOptions, "data_dir", None, help="Data root (torchvision's "
                                "root), recorded in each checkpoint (data.dir) for the commands "
                                f"that read the data again; default {options.DATA_DIR_DEFAULT}.")
    workers: int = same(LoaderOptions, "workers", options.WORKERS)
    amp: bool = opt(False, "--amp", kind="bool", help="Mixed precision (GPU only).")
    # torch threads for the run (default: torch's); results depend on it
    torch_threads: int | None = opt(None, "--torch-threads", kind="int", min=1,
                                    deprecated=("--threads",), help="torch threads for "
                                    "training (default: torch's). Same seed and same thread "
                                    "count give the same run; another thread count gives "
                                    "another (recorded as train.threads).")
    swa_in_loop: bool = opt(False, "--swa-in-loop", kind="bool", help="Also keep the running "
                            "SWA average in memory (written to OUT/swa-inloop.safetensors).")
    # Lightning/SWALR-style annealing into swa_lr (else the paper's)
    anneal_epochs: int | None = opt(None, "--anneal-epochs", kind="int", min=1,
                                    help="Lightning's/SWALR's rule instead of the paper's "
                                    "decay: --lr until --swa-start, then annealed to --swa-lr "
                                    "over N epochs.")
    anneal: Anneal = opt("linear", "--anneal", kind="choice", choices=Anneal,
                         help="Shape of the annealing (with --anneal-epochs).")

    @staticmethod
    def upgrade(saved: dict) -> dict:
        """A config saved by an earlier release, in today's field names (resume)."""
        return {RENAMED.get(k, k): v for k, v in saved.items()}

    def resolved(self) -> TrainConfig:
        """This run with the SWA defaults filled in: `swa_start` an epoch (a fraction below 1
        is of the epochs, default SWA_START_FRACTION), `swa_lr` a rate (default half of
        `lr`, the ratio the paper used on CIFAR-100). Checks every setting."""
        if self.epochs < 1:
            raise OptionError("epochs", "must be 1 or more", self.epochs)
        check_choice("schedule", self.schedule, Schedule)
        check_choice("save", self.save, SaveWhat)
        check_choice("anneal", self.anneal, Anneal)
        if self.anneal_epochs is not None and (self.anneal_epochs < 1 or self.schedule != "swa"
                                               or self.cycle is not None):
            raise OptionError("anneal_epochs", "needs the swa schedule without cycles, and 1 "
                              "or more epochs", self.anneal_epochs)
        out = replace(self, model_kwargs=dict(self.model_kwargs or {}))
        if self.swa_start is not None and self.swa_start >= 1 and float(self.swa_start) == \
                int(self.swa_start):
            out.swa_start = int(self.swa_start)  # 126.0 from a float option is epoch 126
        if self.schedule == "swa":
            start = SWA_START_FRACTION if self.swa_start is None else self.swa_start
            if 0 < start < 1:
                start = max(1, math.floor(start * self.epochs + 0.5))
            if start != int(start) or not 1 <= start <= self.epochs:
                raise OptionError("swa_start", f"an epoch in 1..{self.epochs} or a fraction of "
                                  "the epochs such as 0.75", self.swa_start)
            out.swa_start = int(start)
            out.swa_lr = self.lr / 2 if self.swa_lr is None else self.swa_lr
        out.check()
        return out

    def check(self) -> None:
        if self.epochs < 1:
            raise OptionError("epochs", "must be 1 or more", self.epochs)
        if self.schedule not in ("sgd", "swa"):
            raise OptionError("schedule", "use sgd or swa", self.schedule)
        if self.schedule == "swa":
            if self.swa_start is None or self.swa_lr is None:
                raise OptionError(("schedule", "swa_start", "swa_lr"), "the swa schedule needs a start and a rate")
            if not 1 <= self.swa_start <= self.epochs:
                raise OptionError("swa_start", f"must be in 1..{self.epochs} (the epochs)", self.swa_start)
        if self.cycle is not None and (self.cycle < 1 or self.schedule != "swa"):
            raise OptionError("cycle", "needs the swa schedule and 1 or more epochs", self.cycle)
        if self.save not in ("epoch", "cycle-end", "none"):
            raise OptionError("save", "use epoch, cycle-end or none", self.save)
        if self.save == "cycle-end" and self.schedule != "swa":
            raise OptionError(("save", "schedule"), "saving at cycle ends needs the swa schedule (cycle ends are in its SWA phase)")

    def is_cycle_end(self, completed: int) -> bool:
        """Whether the weights after `completed` epochs sit at an LR cycle's low point."""
        if self.schedule != "swa" or completed < self.swa_start:
            return False
        if self.cycle is None:
            return True  # constant SWA rate: every epoch end is a sampling point
        done = completed - self.swa_start
        return done > 0 and done % self.cycle == 0


# Settings that may change between the calls of one resumed run: where files are, how fast
# they are read and how often the test set is scored. Every other setting defines the run.
RESUMABLE_CHANGES = ("out", "data_dir", "workers", "eval_every")
SWA_START_FRACTION = 0.75  # as Lightning's StochasticWeightAveraging(swa_epoch_start=0.8) allows
RENAMED = {"subset": "train_images", "threads": "torch_threads"}  # 0.1 names -> today's
