"""`ckptavg train`: SGD or SWA schedules, a checkpoint per epoch or cycle end, resumable."""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from ckptavg import options
from ckptavg.errors import CkptavgError, OptionError, user_batches, users_code
from ckptavg.io.atomic import AtomicFile
from ckptavg.io.checkpoint import save
from ckptavg.io.pt import load_torch_file
from ckptavg.nn.build import build_model
from ckptavg.nn.data import (
    INFO,
    data_takes,
    default_data_dir,
    get_dataset,
    holdout_split,
    make_loader,
)
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import predict, scores
from ckptavg.results import Result
from ckptavg.train.config import RESUMABLE_CHANGES, TrainConfig
from ckptavg.train.saver import CheckpointSaver, cpu_state
from ckptavg.train.schedules import cyclic_lr, epoch_lr


@dataclass
class TrainResult(Result):
    """What one `train` call did: the epochs it ran and the files it wrote."""

    out: str
    start_epoch: int
    epochs_run: int
    checkpoints: list[str]
    last: dict[str, Any] | None  # the metrics row of the last epoch run (metrics.jsonl's)
    swa_inloop: str | None
    epoch_seconds: float
    save_blocking_seconds: float
    save_overhead: float  # blocking save time / training time


Callback = Callable[[dict], None]


@dataclass
class _Loaders:
    train: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    train_images: int  # the first N training images are trained on (holdout excluded)


@dataclass
class _State:
    """What carries from one epoch to the next (and through last.pt to a resumed call)."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    epoch: int = 0
    swa_state: dict | None = None
    swa_n: int = 0


def _data_dir(config) -> dict:
    """{"data.dir": the absolute data folder} of a named data set, so that bn-fix and eval
    of the run's files find the images without --data-dir; {} for a user's function."""
    if config.data not in INFO:
        return {}
    return {"data.dir": os.path.abspath(os.path.expanduser(config.data_dir or default_data_dir()))}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Reseeding at every epoch makes a resumed run draw the same batches and
    # augmentations as an uninterrupted one (so no generator state is saved).
    return seed * 1_000_003 + epoch


def train(config: TrainConfig, *, device: str = options.DEVICE, resume: bool = False,
          download: bool = False, stop_after: int | None = None,
          on_batch: Callable[[int, int], None] | None = None,
          on_epoch: Callback | None = None,
          on_stage: Callable[[str], None] | None = None) -> TrainResult:
    """Train a model with the SGD or SWA schedule, saving a checkpoint per epoch.

    Args:
        config: the run (model, data, epochs, schedule, ...).
        resume: continue from `out/last.pt`; every setting but those in RESUMABLE_CHANGES
            must be the same as when the run started. Without it, `out` must be empty or new.
        stop_after: train at most this many epochs in this call (then resume later).
        on_batch, on_epoch, on_stage: progress callbacks: (batch, batches), the epoch's
            metrics row, and what is running now ("epoch 3/20", "epoch 3/20: testing").

    Returns:
        A TrainResult.

    Example:
        >>> r = train(TrainConfig(model="convnet_bn", data="fashion-mnist", epochs=2,
        ...                       out="runs/b", train_images=512, swa_start=2, swa_lr=0.05,
        ...                       eval_every=0), device="cpu")
        >>> [os.path.basename(p) for p in r.checkpoints]
        ['epoch-0001.safetensors', 'epoch-0002.safetensors']
    """
    config = config.resolved()
    before = torch.get_num_threads()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    try:
        return _train(config, device, resume, download, stop_after, on_batch, on_epoch, on_stage)
    finally:
        torch.set_num_threads(before)


def _train(config: TrainConfig, device, resume, download, stop_after, on_batch, on_epoch,
           on_stage) -> TrainResult:
    dev = resolve_device(device)
    if config.amp and dev.type != "cuda":
        raise OptionError(("amp", "device"), "mixed precision needs a CUDA device; drop amp or use device cuda")
    last_path = os.path.join(config.out, "last.pt")
    saved = _resume_state(config, last_path, resume)
    _seed_all(config.seed)
    loaders = _make_loaders(config, dev, download)
    net, model_kwargs = build_model(config.model, config.model_kwargs, config.data, config.data_dir)
    os.makedirs(config.out, exist_ok=True)  # once the data and the model are known good
    net.to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.wd)
    st = _State(net, opt, torch.amp.GradScaler("cuda") if config.amp else None)
    if saved is not None:
        _restore(st, saved)
    saver = CheckpointSaver(config.out, model_arch=config.model, model_kwargs=model_kwargs,
                            data_name=config.data,
                            extra_metadata={"train.schedule": config.schedule,
                                            "data.train_images": loaders.train_images,
                                            "data.holdout": config.holdout,
                                            **_data_dir(config),
                                            "train.threads": torch.get_num_threads()})
    result = TrainResult(config.out, st.epoch, 0, [], None, None, 0.0, 0.0, 0.0)
    end = config.epochs if stop_after is None else min(config.epochs, st.epoch + stop_after)
    stage = on_stage or (lambda text: None)
    with saver:
        for epoch in range(st.epoch, end):
            stage(f"epoch {epoch + 1}/{config.epochs}")
            t0 = time.perf_counter()
            lr, loss, acc = _train_epoch(config, st, loaders.train, epoch, dev, on_batch)
            train_time = time.perf_counter() - t0
            stage(f"epoch {epoch + 1}/{config.epochs}: saving and scoring")
            row, path, save_time = _end_epoch(config, st, saver, loaders, lr, dev, last_path)
            row.update(train_loss=loss, train_acc=acc, seconds=train_time, save_seconds=save_time)
            with open(os.path.join(config.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            if path:
                result.checkpoints.append(path)
            result.epochs_run += 1
            result.epoch_seconds += train_time
            result.save_blocking_seconds += save_time
            result.last = row
            if on_epoch:
                on_epoch(row)
        saver.flush()
        if config.swa_in_loop and st.swa_state is not None:
            result.swa_inloop = os.path.join(config.out, "swa-inloop.safetensors")
            save(st.swa_state, result.swa_inloop,
                 {**saver.base_meta, "average.n": str(st.swa_n), "average.method": "uniform",
                  "bn.stale": "true"})
    if result.epoch_seconds:
        result.save_overhead = result.save_blocking_seconds / result.epoch_seconds
    return result


def _resume_state(config: TrainConfig, last_path: str, resume: bool) -> dict | None:
    """last.pt's contents when resuming (checked against `config`), else None; refuses to
    train over a folder that holds anything without `resume`."""
    if os.path.isdir(config.out) and os.listdir(config.out):
        if not resume:
            raise CkptavgError(f"{config.out}: the run folder is not empty; continue that run "
                               "with resume (--resume) or train into a new folder")
        if not os.path.exists(last_path):
            raise CkptavgError(f"{config.out}: no last.pt to resume from in a non-empty folder; "
                               "train into a new folder")
    elif os.path.exists(config.out) and not os.path.isdir(config.out):
        raise CkptavgError(f"{config.out}: exists and is not a folder; choose a run folder")
    if not resume or not os.path.exists(last_path):
        return None
    state = load_torch_file(last_path)
    saved = TrainConfig.upgrade(state.get("config", {}))
    for f in fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        default = f.default
        if default is MISSING:
            default = None if f.default_factory is MISSING else f.default_factory()
        now, then = getattr(config, f.name), saved.get(f.name, default)
        if now != then:
            raise CkptavgError(f"{last_path}: resuming with {f.name}={now!r} but the run was "
                               f"started with {then!r}; resume with the same settings or "
                               "train into a new folder")
    return state


def _make_loaders(config: TrainConfig, dev: torch.device, download: bool) -> _Loaders:
    if "split" not in data_takes(config.data):
        raise OptionError("data", "takes no `split` parameter, so its training and test "
                          "images cannot be told apart and every test figure would be on "
                          "training images; give it a `split` parameter (called with "
                          "split='train' or 'test')", config.data)
    train_set = get_dataset(config.data, "train", config.data_dir, augment=True, download=download)
    if isinstance(train_set, torch.utils.data.DataLoader):
        raise OptionError("data", "returns a DataLoader; train batches, shuffles and holds "
                          "out images itself, so it needs the Dataset of (image, label) pairs: "
                          "return the loader's .dataset", config.data)
    test_set = get_dataset(config.data, "test", config.data_dir, augment=False, download=download)
    trained, held = holdout_split(len(train_set), config.train_images, config.holdout)
    val = None
    if config.holdout:
        plain = get_dataset(config.data, "train", config.data_dir, augment=False)
        val = make_loader(torch.utils.data.Subset(plain, held), 512, device=str(dev))
    n_train = len(trained)
    train = make_loader(torch.utils.data.Subset(train_set, trained), config.batch_size,
                        shuffle=True, workers=config.workers, seed=_epoch_seed(config.seed, 0),
                        device=str(dev))
    return _Loaders(train, make_loader(test_set, 512, device=str(dev)), val, n_train)


def _restore(st: _State, saved: dict) -> None:
    st.net.load_state_dict(saved["model"])
    st.opt.load_state_dict(saved["optimizer"])
    if st.scaler is not None and saved.get("scaler"):
        st.scaler.load_state_dict(saved["scaler"])
    st.epoch = int(saved["epoch"])
    st.swa_state, st.swa_n = saved.get("swa_state"), int(saved.get("swa_n", 0))


def _train_epoch(config: TrainConfig, st: _State, loader, epoch: int, dev: torch.device,
                 on_batch) -> tuple[float, float, float]:
    """One pass over the training data; returns (last lr, mean loss, accuracy %)."""
    _seed_all(_epoch_seed(config.seed, epoch))
    loader.generator.manual_seed(_epoch_seed(config.seed, epoch))
    iters = len(loader)
    cyclic = config.cycle is not None and epoch >= config.swa_start
    lr = epoch_lr(epoch, schedule=config.schedule, lr_init=config.lr, epochs=config.epochs,
                  swa_start=config.swa_start, swa_lr=config.swa_lr,
                  anneal_epochs=config.anneal_epochs, anneal=config.anneal)
    st.net.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for b, (x, y) in enumerate(user_batches(loader)):
        if cyclic:
            i = (epoch - config.swa_start) * iters + b + 1
            lr = cyclic_lr(i, config.cycle * iters, config.lr, config.swa_lr)
        for g in st.opt.param_groups:
            g["lr"] = lr
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=config.amp), \
                users_code("the model's forward pass"):
            out = st.net(x)
            loss = F.cross_entropy(out, y)
        st.opt.zero_grad(set_to_none=True)
        if st.scaler is not None:
            st.scaler.scale(loss).backward()
            st.scaler.step(st.opt)
            st.scaler.update()
        else:
            loss.backward()
            st.opt.step()
        if not math.isfinite(loss.item()):
            raise CkptavgError(f"epoch {epoch + 1}: the training loss is {loss.item()}; "
                               "lower the learning rate (--lr)")
        loss_sum += loss.item() * y.shape[0]
        correct += (out.argmax(1) == y).sum().item()
        seen += y.shape[0]
        if on_batch:
            on_batch(b + 1, iters)
    return lr, loss_sum / seen, correct / seen * 100


def _end_epoch(config: TrainConfig, st: _State, saver: CheckpointSaver, loaders: _Loaders,
               lr: float, dev: torch.device, last_path: str) -> tuple[dict, str | None, float]:
    """Fold the in-loop SWA average, queue the checkpoint and last.pt, score the epoch.

    Returns (metrics row, checkpoint path or None, seconds the caller waited for saving)."""
    st.epoch += 1
    completed = st.epoch
    phase = "swa" if config.schedule == "swa" and completed >= config.swa_start else "sgd"
    cycle_end = config.is_cycle_end(completed)
    t0 = time.perf_counter()
    weights = cpu_state(st.net)  # the one host copy per epoch: checkpoint, SWA and last.pt
    if config.swa_in_loop and cycle_end:
        _fold_swa(st, weights)
    row = {"epoch": completed, "lr": lr, "phase": phase}
    scores, val_time = {}, 0.0
    if loaders.val is not None:  # before saving: the scores go into the checkpoint's metadata
        t_val = time.perf_counter()
        row["val_loss"], row["val_acc"] = _evaluate(st.net, loaders.val, dev)
        scores = {"train.val_loss": repr(row["val_loss"]), "train.val_acc": repr(row["val_acc"])}
        val_time = time.perf_counter() - t_val
    path = None
    if config.save == "epoch" or (config.save == "cycle-end" and cycle_end):
        path = saver.save_state(weights, epoch=completed, step=completed * len(loaders.train),
                                lr=lr, phase=phase, cycle_end=cycle_end, seed=config.seed,
                                metadata=scores)
    # Everything handed to the writer thread is a copy: training goes on mutating the live
    # optimizer buffers and the in-loop average while last.pt is written.
    resume_state = {"model": weights, "optimizer": _host_copy(st.opt.state_dict()),
                    "scaler": st.scaler.state_dict() if st.scaler else None,
                    "epoch": completed, "config": asdict(config),
                    "swa_state": _host_copy(st.swa_state), "swa_n": st.swa_n,
                    "metadata": {**saver.base_meta, "train.epoch": str(completed),
                                 "train.phase": phase}}
    saver.submit(lambda: _save_resume(resume_state, last_path))
    save_time = time.perf_counter() - t0 - val_time
    if config.eval_every and (completed % config.eval_every == 0 or completed == config.epochs):
        row["test_loss"], row["test_acc"] = _evaluate(st.net, loaders.test, dev)
    return row, path, save_time


def _fold_swa(st: _State, weights: dict[str, torch.Tensor]) -> None:
    """The paper's running mean, kept in float32 like the authors' code."""
    if st.swa_state is None:
        st.swa_state = {k: v.clone() for k, v in weights.items()}
    else:
        for k, v in weights.items():
            if v.is_floating_point():
                st.swa_state[k].mul_(st.swa_n / (st.swa_n + 1)).add_(v / (st.swa_n + 1))
            else:
                st.swa_state[k].copy_(v)
    st.swa_n += 1


def _host_copy(obj):
    """A deep copy of nested dicts/lists with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


@torch.no_grad()
def _evaluate(model, loader, device) -> tuple[float, float]:
    s = scores(*predict(model, loader, device))
    return s.loss, s.accuracy


def _save_resume(state: dict, path: str) -> None:
    with AtomicFile(path) as out:
        torch.save(state, out.file)
