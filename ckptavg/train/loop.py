"""`ckptavg train`: SGD or SWA schedules, a checkpoint per epoch or cycle end, resumable."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ckptavg.errors import CkptavgError
from ckptavg.train.saver import CheckpointSaver, cpu_state
from ckptavg.train.schedules import cyclic_lr, epoch_lr


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in last.pt so --resume continues it)."""

    model: str
    data: str
    epochs: int
    out: str
    schedule: str = "swa"
    lr: float = 0.05
    swa_start: int | None = None
    swa_lr: float | None = None
    wd: float = 5e-4
    momentum: float = 0.9
    batch_size: int = 128
    seed: int = 0
    cycle: int | None = None
    save: str = "epoch"
    subset: int | None = None
    holdout: int = 0
    eval_every: int = 1
    model_kwargs: dict = field(default_factory=dict)
    data_dir: str | None = None
    workers: int = 0
    amp: bool = False
    swa_in_loop: bool = False

    def check(self) -> None:
        if self.epochs < 1:
            raise CkptavgError(f"--epochs {self.epochs}: must be 1 or more")
        if self.schedule not in ("sgd", "swa"):
            raise CkptavgError(f"--schedule {self.schedule}: use sgd or swa")
        if self.schedule == "swa":
            if self.swa_start is None or self.swa_lr is None:
                raise CkptavgError("--schedule swa needs --swa-start and --swa-lr")
            if not 1 <= self.swa_start <= self.epochs:
                raise CkptavgError(f"--swa-start {self.swa_start}: must be in 1..--epochs")
        if self.cycle is not None and (self.cycle < 1 or self.schedule != "swa"):
            raise CkptavgError("--cycle C needs --schedule swa and C >= 1")
        if self.save not in ("epoch", "cycle-end", "none"):
            raise CkptavgError(f"--save {self.save}: use epoch, cycle-end or none")
        if self.save == "cycle-end" and self.schedule != "swa":
            raise CkptavgError("--save cycle-end needs --schedule swa (cycle ends are in its SWA phase)")

    def is_cycle_end(self, completed: int) -> bool:
        """Whether the weights after `completed` epochs sit at an LR cycle's low point."""
        if self.schedule != "swa" or completed < self.swa_start:
            return False
        if self.cycle is None:
            return True  # constant SWA rate: every epoch end is a sampling point
        done = completed - self.swa_start
        return done > 0 and done % self.cycle == 0


Callback = Callable[[dict], None]


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Reseeding at every epoch makes a resumed run draw the same batches and
    # augmentations as an uninterrupted one.
    return seed * 1_000_003 + epoch


@torch.no_grad()
def _evaluate(model, loader, device) -> tuple[float, float]:
    from ckptavg.evaluation import predict, scores

    s = scores(*predict(model, loader, device))
    return s["loss"], s["accuracy"]


def train(config: TrainConfig, *, device: str = "auto", resume: bool = False,
          download: bool = False, stop_after: int | None = None,
          on_batch: Callable[[int, int], None] | None = None,
          on_epoch: Callback | None = None) -> dict:
    """Train a model with the SGD or SWA schedule, saving a checkpoint per epoch.

    Args:
        config: the run (model, data, epochs, schedule, ...).
        resume: continue from `out/last.pt` when it exists.
        stop_after: train at most this many epochs in this call (then resume later).
        on_batch, on_epoch: progress callbacks (batch index, total) and epoch metrics.

    Returns:
        A summary: epochs run, final metrics, checkpoint paths, seconds, saving overhead.
    """
    from ckptavg.bn import resolve_device
    from ckptavg.data import get_dataset, make_loader
    from ckptavg.modelio import build_model

    config.check()
    dev = resolve_device(device)
    if config.amp and dev.type != "cuda":
        raise CkptavgError("--amp needs a CUDA device; drop it or use --device cuda")
    os.makedirs(config.out, exist_ok=True)
    last_path = os.path.join(config.out, "last.pt")
    state = None
    if resume and os.path.exists(last_path):
        from ckptavg.io.pt import load_torch_file

        state = load_torch_file(last_path)
        saved = state.get("config", {})
        for k in ("model", "data", "schedule", "lr", "swa_start", "swa_lr", "seed", "cycle"):
            if saved.get(k) != getattr(config, k):
                raise CkptavgError(f"{last_path}: --resume with {k}={getattr(config, k)!r} but the "
                                   f"run was started with {saved.get(k)!r}; use the same options")

    _seed_all(config.seed)
    train_set = get_dataset(config.data, "train", config.data_dir, augment=True, download=download)
    test_set = get_dataset(config.data, "test", config.data_dir, augment=False, download=download)
    n_train = len(train_set) if config.subset is None else min(config.subset, len(train_set))
    val_loader = None
    if config.holdout:
        if config.holdout >= n_train:
            raise CkptavgError(f"--holdout {config.holdout}: must be less than the {n_train} training images")
        plain = get_dataset(config.data, "train", config.data_dir, augment=False)
        idx = range(n_train - config.holdout, n_train)
        val_loader = make_loader(torch.utils.data.Subset(plain, idx), 512, device=str(dev))
        n_train -= config.holdout
    train_subset = torch.utils.data.Subset(train_set, range(n_train))
    generator_seed = _epoch_seed(config.seed, 0)
    train_loader = make_loader(train_subset, config.batch_size, shuffle=True,
                               workers=config.workers, seed=generator_seed, device=str(dev))
    test_loader = make_loader(test_set, 512, device=str(dev))

    net, model_kwargs = build_model(config.model, config.model_kwargs, config.data, config.data_dir)
    net.to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.wd)
    scaler = torch.amp.GradScaler("cuda") if config.amp else None
    start = 0
    swa_state, swa_n = None, 0
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        swa_state, swa_n = state.get("swa_state"), int(state.get("swa_n", 0))

    saver = CheckpointSaver(config.out, model_arch=config.model, model_kwargs=model_kwargs,
                            data_name=config.data, extra_metadata={"train.schedule": config.schedule})
    iters = len(train_loader)
    summary: dict = {"out": config.out, "checkpoints": [], "epochs_run": 0, "start_epoch": start}
    epoch_seconds, save_seconds = [], []
    metrics_path = os.path.join(config.out, "metrics.jsonl")
    end = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
    try:
        for epoch in range(start, end):
            t0 = time.perf_counter()
            _seed_all(_epoch_seed(config.seed, epoch))
            train_loader.generator.manual_seed(_epoch_seed(config.seed, epoch))
            cyclic = config.cycle is not None and epoch >= config.swa_start
            lr = epoch_lr(epoch, schedule=config.schedule, lr_init=config.lr, epochs=config.epochs,
                          swa_start=config.swa_start, swa_lr=config.swa_lr)
            net.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for b, (x, y) in enumerate(train_loader):
                if cyclic:
                    i = (epoch - config.swa_start) * iters + b + 1
                    lr = cyclic_lr(i, config.cycle * iters, config.lr, config.swa_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=torch.float16, enabled=config.amp):
                    out = net(x)
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if not math.isfinite(loss.item()):
                    raise CkptavgError(f"epoch {epoch + 1}: the training loss is {loss.item()}; "
                                       "lower --lr")
                loss_sum += loss.item() * y.shape[0]
                correct += (out.argmax(1) == y).sum().item()
                seen += y.shape[0]
                if on_batch:
                    on_batch(b + 1, iters)
            completed = epoch + 1
            train_time = time.perf_counter() - t0
            phase = "swa" if config.schedule == "swa" and completed >= config.swa_start else "sgd"
            cycle_end = config.is_cycle_end(completed)
            t_copy = time.perf_counter()
            weights = cpu_state(net)  # one host copy per epoch, for the in-loop SWA and last.pt
            copy_time = time.perf_counter() - t_copy
            if config.swa_in_loop and cycle_end:
                # The paper's running mean, kept in float32 like the authors' code.
                if swa_state is None:
                    swa_state = {k: v.clone() for k, v in weights.items()}
                else:
                    for k, v in weights.items():
                        if v.is_floating_point():
                            swa_state[k].mul_(swa_n / (swa_n + 1)).add_(v / (swa_n + 1))
                        else:
                            swa_state[k].copy_(v)
                swa_n += 1
            t_save = time.perf_counter()
            if config.save == "epoch" or (config.save == "cycle-end" and cycle_end):
                path = saver.save(net, epoch=completed, step=completed * iters, lr=lr, phase=phase,
                                  cycle_end=cycle_end, seed=config.seed)
                summary["checkpoints"].append(path)
            resume_state = {"model": weights, "optimizer": opt.state_dict(),
                            "scaler": scaler.state_dict() if scaler else None,
                            "epoch": completed, "config": asdict(config),
                            "swa_state": swa_state, "swa_n": swa_n,
                            "rng": torch.get_rng_state(),
                            "metadata": {**saver.base_meta, "train.epoch": str(completed),
                                         "train.phase": phase}}
            saver.submit(lambda s=resume_state: _save_resume(s, last_path))
            save_time = copy_time + time.perf_counter() - t_save
            row = {"epoch": completed, "lr": lr, "phase": phase, "train_loss": loss_sum / seen,
                   "train_acc": correct / seen * 100, "seconds": train_time,
                   "save_seconds": save_time}
            if val_loader is not None:
                row["val_loss"], row["val_acc"] = _evaluate(net, val_loader, dev)
            if config.eval_every and (completed % config.eval_every == 0 or completed == config.epochs):
                row["test_loss"], row["test_acc"] = _evaluate(net, test_loader, dev)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            epoch_seconds.append(train_time)
            save_seconds.append(save_time)
            summary["epochs_run"] += 1
            summary["last"] = row
            if on_epoch:
                on_epoch(row)
        saver.flush()
        if config.swa_in_loop and swa_state is not None:
            from ckptavg.checkpoint import save

            path = os.path.join(config.out, "swa-inloop.safetensors")
            save(swa_state, path, {**saver.base_meta, "average.n": str(swa_n),
                                   "average.method": "uniform", "bn.stale": "true"})
            summary["swa_inloop"] = path
    finally:
        saver.close()
    summary["epoch_seconds"] = sum(epoch_seconds)
    summary["save_blocking_seconds"] = sum(save_seconds)
    summary["save_overhead"] = (sum(save_seconds) / sum(epoch_seconds)) if epoch_seconds else 0.0
    return summary


def _save_resume(state: dict, path: str) -> None:
    from ckptavg.io.writer import AtomicFile

    with AtomicFile(path) as out:
        torch.save(state, out.file)
