"""Checkpoint saving that does not stall training: copy to CPU, write in a thread, atomically.

Usable from any PyTorch loop:

    saver = CheckpointSaver("runs/a", model_arch="preresnet20", data_name="cifar10")
    for epoch in range(1, epochs + 1):
        train_one_epoch(...)
        saver.save(model, epoch=epoch, lr=lr, phase="swa" if epoch > swa_start else "sgd")
    saver.close()          # waits for the writes; raises if one failed
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time

import torch

from ckptavg.io.checkpoint import save
from ckptavg.io.keys import tensor_identity
from ckptavg.version import __version__


def cpu_state(model_or_state) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict (tied tensors stay tied)."""
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        ident = tensor_identity(v) or (k,)
        if ident not in copies:
            copies[ident] = v.detach().to("cpu", copy=True)
        out[k] = copies[ident]
    return out


class CheckpointSaver:
    """Writes `DIR/epoch-0001.safetensors` (weights + metadata) from a background thread.

    Args:
        out_dir: the run folder (created).
        model_arch, model_kwargs, data_name: recorded as model.*/data.* metadata so that
            bn-fix and eval can rebuild the network.
        background: write in a thread (default); False writes before save() returns.
        extra_metadata: more str -> str entries for every checkpoint.
    """

    def __init__(self, out_dir: str | os.PathLike, *, model_arch: str | None = None,
                 model_kwargs: dict | None = None, data_name: str | None = None,
                 background: bool = True, extra_metadata: dict | None = None):
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.base_meta = {"ckptavg.version": __version__}
        if model_arch:
            self.base_meta["model.arch"] = model_arch
            self.base_meta["model.kwargs"] = json.dumps(model_kwargs or {}, sort_keys=True)
        if data_name:
            self.base_meta["data.name"] = data_name
        self.base_meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        self.background = background
        self.blocking_seconds = 0.0  # time save() kept the caller waiting
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._work, name="ckptavg-saver", daemon=True)
            self._thread.start()

    def path_for(self, epoch: int) -> str:
        return os.path.join(self.out_dir, f"epoch-{epoch:04d}.safetensors")

    def save(self, model, *, epoch: int, step: int | None = None, lr: float | None = None,
             phase: str = "sgd", cycle_end: bool = False, seed: int | None = None,
             metadata: dict | None = None) -> str:
        """Queue the weights after `epoch` completed epochs; returns the path written.

        Only the device-to-host copy of the weights happens on the caller's time."""
        t0 = time.perf_counter()
        state = cpu_state(model)
        self.blocking_seconds += time.perf_counter() - t0
        return self.save_state(state, epoch=epoch, step=step, lr=lr, phase=phase,
                               cycle_end=cycle_end, seed=seed, metadata=metadata)

    def save_state(self, state: dict[str, torch.Tensor], *, epoch: int, step: int | None = None,
                   lr: float | None = None, phase: str = "sgd", cycle_end: bool = False,
                   seed: int | None = None, metadata: dict | None = None) -> str:
        """`save` for a host copy the caller made (from `cpu_state`) and will not change."""
        t0 = time.perf_counter()
        self._raise()
        meta = {**self.base_meta, "train.epoch": str(epoch), "train.phase": phase,
                "train.cycle_end": "true" if cycle_end else "false"}
        if step is not None:
            meta["train.step"] = str(step)
        if lr is not None:
            meta["train.lr"] = repr(float(lr))
        if seed is not None:
            meta["train.seed"] = str(seed)
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        path = self.path_for(epoch)
        self.submit(lambda: _write_weights(state, path, meta))
        self.blocking_seconds += time.perf_counter() - t0
        return path

    def submit(self, job) -> None:
        """Run `job()` on the writer thread (or now, without one)."""
        if self._thread is None:
            job()
        else:
            self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # surfaced on the next save() or close()
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def flush(self) -> None:
        """Wait until every queued checkpoint is on disk."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_weights(state: dict, path: str, meta: dict) -> None:
    save(state, path, meta, overwrite=True)  # the run's own folder
