"""Prediction ensembles: the mean of the snapshots' softmax outputs (what SWA approximates)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptavg.errors import CkptavgError
from ckptavg.nn.build import build_from_checkpoint
from ckptavg.nn.data import eval_split, get_dataset, make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import checkpoint_warnings, predict, scores
from ckptavg.options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Split,
    check_choice,
    network_fields,
)
from ckptavg.results import Result


@dataclass
class Member(Result):
    checkpoint: str
    accuracy: float
    loss: float
    samples: int


@dataclass
class EnsembleResult(Result):
    """Scores of the ensemble (mean softmax of the members) and of each member."""

    data: str
    split: str
    members: list[Member]
    n: int
    accuracy: float
    loss: float
    samples: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def ensemble(checkpoints: Sequence[str | os.PathLike], *,
             model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
             loader: LoaderOptions | None = None, reading: Reading | None = None,
             split: Split | None = None, eval_images: int | None = None,
             progress=None) -> EnsembleResult:
    """Accuracy and loss of the ensemble (mean of softmax) of `checkpoints`, and of each member.

    Args:
        checkpoints: files ckptavg reads (globs are expanded by the CLI, not here).
        model, data, loader, reading, split, eval_images: as for `evaluate`; the data
            set is the first checkpoint's unless given.
        progress: called with (members done, members).

    Returns:
        An EnsembleResult.

    Example:
        >>> r = ensemble(["runs/a/epoch-0005.safetensors", "runs/a/epoch-0006.safetensors"],
        ...              eval_images=300)
        >>> r.n, r.samples, [m.samples for m in r.members]
        (2, 300, [300, 300])
    """
    (model, model_kwargs, data, data_dir, download, batch_size, workers, device, input_key,
     key, strip_prefix) = network_fields(model, data, loader, reading)
    subset = eval_images
    if split is not None:
        check_choice("split", split, Split)
    if not checkpoints:
        raise CkptavgError("no checkpoints given to ensemble")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    total, labels, members, data_name, warnings = None, None, [], data, []
    loader = None
    for i, ckpt in enumerate(checkpoints):
        net, _, meta, name = build_from_checkpoint(ckpt, model, model_kwargs, data_name, data_dir,
                                                   key, strip_prefix)
        warnings += checkpoint_warnings(os.fspath(ckpt), meta, name, model)
        if loader is None:
            data_name = name
            split = eval_split(name, split)
            ds = get_dataset(name, split, data_dir, augment=False, download=download)
            loader = make_loader(ds, batch_size, workers=workers, subset=subset, device=str(dev),
                                     subset_option="eval_images")
        probs, y = predict(net.to(dev), loader, dev, input_key)
        labels = y if labels is None else labels
        total = probs.double() if total is None else total + probs
        s = scores(probs, y)
        members.append(Member(os.fspath(ckpt), s.accuracy, s.loss, s.samples))
        if progress:
            progress(i + 1, len(checkpoints))
    s = scores((total / len(checkpoints)).float(), labels)
    return EnsembleResult(data_name, split, members, len(checkpoints), s.accuracy, s.loss,
                          s.samples, time.perf_counter() - t0, warnings)
