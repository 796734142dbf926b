"""Prediction ensembles: the mean of the snapshots' softmax outputs (what SWA approximates)."""

from __future__ import annotations

import os
import time


def ensemble(checkpoints: list[str], *, data: str | None = None, split: str = "test",
             data_dir: str | None = None, download: bool = False, model: str | None = None,
             model_kwargs: dict | None = None, batch_size: int = 256, workers: int = 0,
             device: str = "auto", subset: int | None = None, progress=None) -> dict:
    """Accuracy and loss of the ensemble (mean of softmax) of `checkpoints`, and of each member.

    Example:
        >>> ensemble(["runs/a/epoch-0126.safetensors", "runs/a/epoch-0127.safetensors"])
    """
    from ckptavg.bn import resolve_device
    from ckptavg.data import get_dataset, make_loader
    from ckptavg.evaluation import predict, scores
    from ckptavg.modelio import build_from_checkpoint

    if not checkpoints:
        from ckptavg.errors import CkptavgError

        raise CkptavgError("no checkpoints given to ensemble")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    total, labels, members, data_name = None, None, [], data
    loader = None
    for i, ckpt in enumerate(checkpoints):
        net, _, meta, name = build_from_checkpoint(ckpt, model, model_kwargs, data_name, data_dir)
        if loader is None:
            data_name = name
            ds = get_dataset(name, split, data_dir, augment=False, download=download)
            loader = make_loader(ds, batch_size, workers=workers, subset=subset, device=str(dev))
        probs, y = predict(net.to(dev), loader, dev)
        labels = y if labels is None else labels
        total = probs.double() if total is None else total + probs
        members.append({"checkpoint": os.fspath(ckpt), **scores(probs, y)})
        if progress:
            progress(i + 1, len(checkpoints))
    mean = (total / len(checkpoints)).float()
    return {"data": data_name, "split": split, "members": members, "n": len(checkpoints),
            **scores(mean, labels), "seconds": time.perf_counter() - t0}
