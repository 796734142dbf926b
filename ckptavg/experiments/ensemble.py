"""Prediction ensembles: the mean of the snapshots' softmax outputs (what SWA approximates)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ckptavg.errors import CkptavgError
from ckptavg.nn.build import network
from ckptavg.nn.data import eval_split, make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import checkpoint_warnings, predict, scores
from ckptavg.options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Split,
    check_choice,
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
    ld, d = LoaderOptions.of(loader), DataOptions.of(data)
    batch_size, workers, input_key = ld.batch_size, ld.workers, ld.input_key
    subset = eval_images
    if split is not None:
        check_choice("split", split, Split)
    if not checkpoints:
        raise CkptavgError("no checkpoints given to ensemble")
    t0 = time.perf_counter()
    dev = resolve_device(ld.device)
    total, labels, members, warnings = None, None, [], []
    loader = None
    for i, ckpt in enumerate(checkpoints):
        built = network(ckpt, model, d, reading)
        net, meta, name = built.net, built.meta, built.data
        warnings += checkpoint_warnings(os.fspath(ckpt), meta, name,
                                        ModelOptions.of(model).model)
        if loader is None:  # the first checkpoint's data set (and folder) for every member
            d = replace(d, data=name, data_dir=built.data_dir)
            split = eval_split(name, split)
            ds = built.dataset(split)
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
    return EnsembleResult(d.data, split, members, len(checkpoints), s.accuracy, s.loss,
                          s.samples, time.perf_counter() - t0, warnings)
