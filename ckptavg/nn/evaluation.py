"""Accuracy and mean cross-entropy of a checkpoint, or of a prediction ensemble."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ckptavg.errors import DataError, user_batches, users_code
from ckptavg.nn.build import network
from ckptavg.nn.calibration import nll_per_sample
from ckptavg.nn.data import (
    batches_here,
    eval_split,
    own_share,
    pass_loader,
    split_batch,
)
from ckptavg.nn.device import resolve_device
from ckptavg.options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Split,
    check_choice,
)
from ckptavg.parallel import Group, world_size
from ckptavg.results import Progress, Result


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device=None, input_key: str | None = None,
            progress: Progress | None = None,
            shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities [N, C] on CPU, labels [N]) of `model` in eval mode; with
    `shard=(rank, ranks)`, only batches i with i % ranks == rank."""
    model.eval()
    probs, labels = [], []
    total = batches_here(loader) or 0
    rank, ranks = shard
    step = 1 if own_share(loader, rank, ranks) else ranks  # else skip the others' batches
    for i, batch in enumerate(user_batches(loader)):
        if i % step != rank % step:
            continue
        x, y = split_batch(batch, input_key)
        if y is None:
            raise DataError("evaluation needs labels; the batches carry none")
        if device is not None:
            x = x.to(device, non_blocking=True)
        with users_code("the model's forward pass"):
            out = model(x)
        probs.append(F.softmax(out.float(), dim=1).cpu())
        labels.append(torch.as_tensor(y).cpu())
        if progress:
            progress(i + 1, total)
    if not probs and ranks == 1:
        raise DataError("the evaluation data set is empty")
    if not probs:  # a rank with no batch (fewer batches than ranks)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(labels)


def _per_sample(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1.0 where the top class is the label, cross-entropy), per sample, in float64."""
    correct = (probs.argmax(1) == labels).double()
    return correct, nll_per_sample(probs, labels)


@dataclass
class Scores(Result):
    """Accuracy (%), mean cross-entropy and the number of samples scored."""

    accuracy: float
    loss: float
    samples: int


def scores(probs: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Accuracy (%) and mean cross-entropy of class probabilities against labels.

    Args:
        probs: (N, classes) probabilities.
        labels: (N,) class indices.

    Returns:
        Scores(accuracy, loss, samples).

    Example:
        >>> import torch
        >>> s = scores(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        >>> s.accuracy, s.samples
        (50.0, 2)
    """
    n = labels.numel()
    correct, nll = _per_sample(probs, labels)
    return Scores(correct.sum().item() / n * 100, nll.mean().item(), n)


@dataclass
class EvalResult(Result):
    """Accuracy (%), mean cross-entropy and sample count of one checkpoint on a split.

    `warnings` lists what makes the numbers doubtful (stale BatchNorm statistics, a data
    set other than the one the checkpoint was trained on)."""

    checkpoint: str
    data: str
    split: str
    accuracy: float
    loss: float
    samples: int
    bn_stale: bool
    device: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _scores_across_ranks(probs: torch.Tensor, labels: torch.Tensor) -> Scores:
    """`scores` over the batches of every rank: correct counts, summed NLL and sample counts
    all-reduced in float64."""
    sums = torch.zeros(3, dtype=torch.float64)
    if labels.numel():
        correct, nll = _per_sample(probs, labels)
        sums[0], sums[1], sums[2] = correct.sum(), nll.sum(), labels.numel()
    dist.all_reduce(sums)
    n = int(sums[2])
    if n == 0:
        raise DataError("the evaluation data set is empty")
    return Scores(float(sums[0]) / n * 100, float(sums[1]) / n, n)


def checkpoint_warnings(path: str, meta: dict[str, str], data_name: str,
                        model: str | None = None) -> list[str]:
    """What a caller should know before trusting a score of this checkpoint. `model`: the
    model named by the caller (--model), which a suggested command then names too."""
    out = []
    named = f" --model {model}" if model and (model != meta.get("model.arch")) else ""
    fix = f"ckptavg bn-fix {path} --data {data_name}{named}"
    if meta.get("bn.stale") == "true":
        out.append(f"{path} has bn.stale=true (averaged, BatchNorm not recalibrated): "
                   f"recalibrate it first ({fix} -o FIXED, or ckptavg.bn_fix)")
    trained_on = meta.get("data.name")
    if trained_on and trained_on != data_name:
        out.append(f"{path} was trained on {trained_on} (data.name) but is evaluated on "
                   f"{data_name}")
    bn_data = meta.get("bn.data")
    if bn_data and meta.get("bn.stale") != "true" and bn_data != data_name \
            and not bn_data.startswith(data_name + ":"):
        out.append(f"{path}: its BatchNorm statistics were computed on {bn_data} (bn.data), "
                   f"but it is evaluated on {data_name}; where the two differ, recompute them "
                   f"on the data you evaluate on ({fix} -o FIXED)")
    return out


def evaluate(checkpoint: str | os.PathLike, *,
             model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
             loader: LoaderOptions | None = None, reading: Reading | None = None,
             split: Split | None = None, eval_images: int | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Accuracy, mean cross-entropy and sample count of a checkpoint on a data split.

    Args:
        checkpoint: any format ckptavg reads; the network comes from its model.* metadata
            unless `model` is given, the data set from its data.name unless `data` is.
        split: "test" or "train" (without augmentation); default "test", asked of the data
            (a user's function that takes no `split` cannot be asked: then say which
            split it returns, or it is an OptionError).
        eval_images: score only the first N images of the split.
        model, data: `ModelOptions`/`DataOptions` (or just a name) when the metadata does
            not say, or says otherwise.
        loader: batch size, workers, dict-batch input key, device (`LoaderOptions`).
        reading: where the weights are in a training checkpoint (`Reading`, as for `average`).
        progress: called with (batches done, batches in the pass).

    Returns:
        An EvalResult. `bn_stale` is True when the checkpoint's BatchNorm statistics were
        not recalibrated after averaging: its accuracy is then not representative.

    Example:
        >>> r = ckptavg.evaluate("swa.safetensors", data="fashion-mnist", eval_images=500)
        >>> r.split, r.samples, 0 <= r.accuracy <= 100
        ('test', 500, True)
    """
    ld = LoaderOptions.of(loader)
    batch_size, workers, input_key = ld.batch_size, ld.workers, ld.input_key
    subset = eval_images
    t0 = time.perf_counter()
    if split is not None:
        check_choice("split", split, Split)
    path = os.fspath(checkpoint)
    built = network(path, model, data, reading)
    net, meta, data_name = built.net, built.meta, built.data
    split = eval_split(data_name, split)
    dev = resolve_device(ld.device)
    dataset = built.dataset(split)
    if world_size() > 1:  # under torchrun: batch i on rank i % P, sums all-reduced
        with Group() as group:
            loader = pass_loader(dataset, batch_size, workers=workers, subset=subset,
                                 rank=group.rank, ranks=group.size, device=str(dev),
                                 subset_option="eval_images")
            probs, labels = predict(net.to(dev), loader, dev, input_key, progress,
                                    shard=(group.rank, group.size))
            s = _scores_across_ranks(probs, labels)
    else:
        loader = pass_loader(dataset, batch_size, workers=workers, subset=subset, device=str(dev),
                             subset_option="eval_images")
        probs, labels = predict(net.to(dev), loader, dev, input_key, progress)
        s = scores(probs, labels)
    return EvalResult(path, data_name, split, s.accuracy, s.loss, s.samples,
                      meta.get("bn.stale") == "true", str(dev), time.perf_counter() - t0,
                      checkpoint_warnings(path, meta, data_name, ModelOptions.of(model).model))
