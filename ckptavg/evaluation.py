"""Accuracy and mean cross-entropy of a checkpoint, or of a prediction ensemble."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ckptavg.data import split_batch
from ckptavg.errors import DataError

Progress = Callable[[int, int], None]


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device=None, input_key: str | None = None,
            progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities [N, C] on CPU, labels [N]) of `model` in eval mode."""
    model.eval()
    probs, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else 0
    for i, batch in enumerate(loader):
        x, y = split_batch(batch, input_key)
        if y is None:
            raise DataError("evaluation needs labels; the batches carry none")
        if device is not None:
            x = x.to(device, non_blocking=True)
        probs.append(F.softmax(model(x).float(), dim=1).cpu())
        labels.append(torch.as_tensor(y).cpu())
        if progress:
            progress(i + 1, total)
    if not probs:
        raise DataError("the evaluation data set is empty")
    return torch.cat(probs), torch.cat(labels)


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy (%) and mean cross-entropy of probabilities."""
    n = labels.numel()
    acc = (probs.argmax(1) == labels).double().sum().item() / n * 100
    nll = -torch.log(probs.gather(1, labels.view(-1, 1)).clamp_min(1e-12)).double().mean().item()
    return {"accuracy": acc, "loss": nll, "samples": n}


def evaluate(checkpoint: str | os.PathLike, *, data: str | None = None, split: str = "test",
             data_dir: str | None = None, download: bool = False, model: str | None = None,
             model_kwargs: dict | None = None, batch_size: int = 256, workers: int = 0,
             device: str = "auto", input_key: str | None = None, subset: int | None = None,
             progress: Progress | None = None) -> dict:
    """Accuracy, mean cross-entropy and sample count of a checkpoint on a data split.

    The result's `bn_stale` is True when the checkpoint's BatchNorm statistics were not
    recalibrated after averaging (metadata `bn.stale=true`): its accuracy is then not
    representative; run bn_fix first.

    Example:
        >>> ckptavg.evaluate("swa.safetensors", data="cifar10")["accuracy"]
    """
    from ckptavg.bn import resolve_device
    from ckptavg.data import get_dataset, make_loader
    from ckptavg.modelio import build_from_checkpoint

    t0 = time.perf_counter()
    net, _, meta, data_name = build_from_checkpoint(checkpoint, model, model_kwargs, data,
                                                    data_dir)
    dev = resolve_device(device)
    dataset = get_dataset(data_name, split, data_dir, augment=False, download=download)
    loader = make_loader(dataset, batch_size, workers=workers, subset=subset, device=str(dev))
    probs, labels = predict(net.to(dev), loader, dev, input_key, progress)
    return {"checkpoint": os.fspath(checkpoint), "data": data_name, "split": split,
            **scores(probs, labels), "bn_stale": meta.get("bn.stale") == "true",
            "device": str(dev), "seconds": time.perf_counter() - t0}
