"""BatchNorm recalibration: one pass over data with the averaged weights.

`stats="update_bn"` reproduces `torch.optim.swa_utils.update_bn`: running statistics are
reset, momentum set to None (an equal-weight average over batches of the batch mean and
unbiased batch variance), one pass in train mode, then momenta and modes restored.
`stats="exact"` instead sets each layer to the population statistics of its inputs over
every sample of the pass: pooled mean and unbiased variance (within- plus between-batch
spread), merged batch by batch in float64 (Chan et al.'s parallel algorithm).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ckptavg import options
from ckptavg.errors import CkptavgError, DataError, OptionError, user_batches, users_code
from ckptavg.io import open_checkpoint
from ckptavg.io.checkpoint import layout_of, save
from ckptavg.io.keys import AVERAGED_COUNT
from ckptavg.io.metadata import meta_int
from ckptavg.nn.build import network, wrapper_prefix
from ckptavg.nn.data import (
    PassBatches,
    batch_seed,
    describe_data,
    own_share,
    pass_batches,
    pass_loader,
    seeded,
    split_batch,
)
from ckptavg.nn.device import resolve_device
from ckptavg.options import (
    DataOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Split,
    Stats,
    check_choice,
)
from ckptavg.parallel import Group, world_size
from ckptavg.results import Progress, Result


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Pooled:
    """Per-channel count, mean and M2 of a layer's inputs, merged batch by batch."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm):
        self.module = module
        self.n = 0
        self.mean = None
        self.m2 = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach()
        dims = [d for d in range(x.dim()) if d != 1]
        x64 = x.to(torch.float64)
        mb = x64.mean(dim=dims)
        m2b = ((x64 - mb.view([1, -1] + [1] * (x.dim() - 2))) ** 2).sum(dim=dims)
        self.merge(x.numel() // x.shape[1], mb, m2b)

    def merge(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        """Fold in another part's count, mean and M2 (Chan et al.'s parallel update)."""
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def apply(self) -> None:
        self.handle.remove()
        if self.n == 0:
            return
        m = self.module
        m.running_mean.copy_(self.mean.to(m.running_mean.dtype))
        m.running_var.copy_((self.m2 / max(self.n - 1, 1)).to(m.running_var.dtype))


class _BatchMeans:
    """Sums, in float64, of a layer's batch means and unbiased batch variances, and the batch
    count: torch's momentum=None statistics are their averages, and sums can be all-reduced
    across ranks."""

    def __init__(self, module: nn.modules.batchnorm._BatchNorm):
        self.module = module
        self.n = 0
        self.sums = torch.zeros(2, module.num_features, dtype=torch.float64)
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        if self.sums.device != x.device:  # summed where the batch is: no sync per batch
            self.sums = self.sums.to(x.device)
        self.sums[0] += x.mean(dim=dims)
        self.sums[1] += x.var(dim=dims, correction=1)
        self.n += 1

    def apply(self) -> None:
        self.handle.remove()
        # A few KB per layer: exchanged through gloo on the CPU, whatever the device.
        self.sums = self.sums.cpu()
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        dist.all_reduce(self.sums)
        dist.all_reduce(n)
        m = self.module
        m.running_mean.copy_((self.sums[0] / n).to(m.running_mean.dtype))
        m.running_var.copy_((self.sums[1] / n).to(m.running_var.dtype))


def _merge_pooled(pooled: list[_Pooled]) -> None:
    """Each layer's (count, mean, M2) from every rank, merged in rank order (Chan et al.)."""
    for p in pooled:
        mine = (p.n, None if p.mean is None else p.mean.cpu(), None if p.m2 is None else p.m2.cpu())
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        p.n, p.mean, p.m2 = 0, None, None
        for nb, mb, m2b in parts:
            if nb:
                p.merge(nb, mb, m2b)


@dataclass
class Recalibration(Result):
    """What one BatchNorm pass saw: the layers recalibrated, batches and samples."""

    bn_layers: int
    batches: int
    samples: int


@torch.no_grad()
def recalibrate(model: nn.Module, loader, *, stats: Stats = options.STATS,
                device: str | torch.device | None = None, max_batches: int | None = None,
                input_key: str | None = None, progress: Progress | None = None) -> Recalibration:
    """Recompute the BatchNorm statistics of `model` in place with one pass over `loader`.

    Args:
        model: any module; layers that are not BatchNorm are left as they are.
        loader: yields tensors, (input, target) tuples or dicts (`input_key`).
        stats: "update_bn" (torch's semantics) or "exact" (population statistics).
        device: where the pass runs (default: where the model's parameters are).
        max_batches: stop after this many batches.
        input_key: the key of a dict batch that holds the input (default: the first tensor).
        progress: called with (batches done, batches in the pass).

    Returns:
        A `Recalibration` (bn_layers, batches, samples); bn_layers is 0 (and nothing runs)
        without BatchNorm.

    Under torch.distributed (torchrun), batch i of the pass goes through the model on rank
    i % world_size: a `data.pass_loader` made for this rank loads only those batches; any
    other loader is iterated whole by every rank (same seed, same order), each rank skipping
    the others' batches. The statistics are then combined across ranks: for "update_bn",
    the average over all batches of the batch means and unbiased variances (what
    momentum=None computes in one process); for "exact", each rank's pooled (count, mean,
    M2) merged in rank order. Counts are totals over all ranks.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> loader = [torch.randn(8, 3) for _ in range(5)]
        >>> r = recalibrate(net, loader)  # the statistics torch.optim.swa_utils.update_bn sets
        >>> r.bn_layers, r.batches, r.samples
        (1, 5, 40)
    """
    check_choice("stats", stats, Stats)
    layers = bn_layers(model)
    if not layers:
        return Recalibration(0, 0, 0)
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if ranks > 1 else 0
    pooled = [_Pooled(m) for m in layers] if stats == "exact" else []
    means = [_BatchMeans(m) for m in layers] if ranks > 1 and stats == "update_bn" else []
    shared = own_share(loader, rank, ranks) and ranks > 1  # this rank's batches only
    sampler = getattr(loader, "batch_sampler", None)
    seed = sampler.seed if isinstance(sampler, PassBatches) else None
    total = pass_batches(loader) or 0
    if max_batches is not None:
        total = min(total, max_batches) if total else max_batches
    batches = samples = 0
    try:
        for i, batch in enumerate(user_batches(loader)):
            g = i * ranks + rank if shared else i  # the batch's index in the whole pass
            if max_batches is not None and g >= max_batches:
                break
            if g % ranks != rank:
                continue
            x, _ = split_batch(batch, input_key)
            if device is not None:
                x = x.to(device, non_blocking=True)
            with users_code("the model's forward pass"):
                if seed is None:
                    model(x)
                else:  # random layers (dropout) draw the same numbers on any rank
                    with seeded(batch_seed(seed, g), device):
                        model(x)
            batches += 1
            samples += x.shape[0]
            if progress:
                progress(g + 1, total)
    finally:
        if ranks > 1:
            _merge_pooled(pooled)
            for b in means:
                b.apply()
            counts = torch.tensor([batches, samples], dtype=torch.float64)
            dist.all_reduce(counts)
            batches, samples = int(counts[0]), int(counts[1])
        for p in pooled:
            p.apply() if batches else p.handle.remove()
        for m, mom in momenta.items():
            m.momentum = mom
        model.train(was_training)
    if batches == 0:
        raise CkptavgError("the data pass saw no batch; check the data set and the batch limits "
                           "(--batches, --fraction)")
    return Recalibration(len(layers), batches, samples)


@dataclass
class BnFixResult(Result):
    """What `bn_fix` did. `output` is None when the model has no BatchNorm (nothing written)."""

    checkpoint: str
    output: str | None
    bn_layers: int
    batches: int
    samples: int
    data: str
    stats: str
    device: str
    seconds: float
    message: str | None = None  # why nothing was written, when nothing was
    warnings: list[str] = field(default_factory=list)


def bn_fix(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, *,
           model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
           loader: LoaderOptions | None = None, reading: Reading | None = None,
           split: Split = "train", augment: bool = True, batches: int | None = None,
           fraction: float | None = None, bn_images: int | None = None,
           seed: int = options.SEED, stats: Stats = options.STATS,
           progress: Progress | None = None) -> BnFixResult:
    """Recalibrate the BatchNorm statistics of a checkpoint with a data pass and save it.

    Args:
        checkpoint: an averaged checkpoint (any format ckptavg reads).
        output: where to write; in place (atomically) when None.
        model: the network (`ModelOptions` or a name); default: the checkpoint's
            `model.arch`/`model.kwargs`.
        data: the data set (`DataOptions` or a name); default: the checkpoint's `data.name`.
        loader: batch size, workers, dict-batch input key, device (`LoaderOptions`).
        reading: where the weights are in the checkpoint (`Reading`: a training checkpoint's
            entry, a prefix to strip, as for `average`).
        split, augment: which images, with or without the training transforms (the paper
            uses the augmented training set).
        batches, fraction: use only this many batches, or this share of the batches (not both).
        bn_images: use only the first N images of the split. Default: the images the run trained
            on when the checkpoint records them (`data.train_images`, written by `train`) and
            the data set is the run's own.
        stats: "update_bn" (torch.optim.swa_utils.update_bn semantics) or "exact".
        seed: the pass's image order (torch.randperm) and, per batch, its augmentations and
            dropout draws: the same result for any `workers` and any number of torchrun ranks
            (docs/scaling.md). torch's global generator is not touched.
        progress: called with (batches done, batches in the pass).

    Returns:
        A BnFixResult; `bn_layers == 0` means the model has no BatchNorm and nothing was
        written (the checkpoint is marked `bn.stale=false` only when it said otherwise).

    Example:
        >>> r = ckptavg.bn_fix("swa.safetensors", data="fashion-mnist", batches=2)
        >>> r.bn_layers, r.samples, ckptavg.load("swa.safetensors")[1]["bn.stale"]
        (3, 512, 'false')
    """
    ld, rd = LoaderOptions.of(loader), Reading.of(reading)
    batch_size, workers, input_key = ld.batch_size, ld.workers, ld.input_key
    key, strip_prefix = rd.key, rd.strip_prefix
    subset = bn_images
    t0 = time.perf_counter()
    check_choice("stats", stats, Stats)
    check_choice("split", split, Split)
    if batches is not None and fraction is not None:
        raise OptionError(("batches", "fraction"), "give one, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise OptionError("fraction", "must be in (0, 1]", fraction)
    if batches is not None and batches < 1:
        raise OptionError("batches", "must be 1 or more", batches)
    path = os.fspath(checkpoint)
    if output is None:
        _check_in_place(path, key, strip_prefix)
    built = network(checkpoint, model, data, rd)
    net, state, meta, data_name = built.net, built.state, built.meta, built.data
    dev = resolve_device(ld.device)
    # keyed and laid out as the input was (Lightning's model., DDP's module., its entry and
    # hyper-parameters), so the output loads where the input loads; in place (no output):
    # the file the user named to fix, checked to lose nothing
    layout = layout_of(path, key, strip_prefix)

    def write(weights: dict, to: str, metadata: dict) -> None:
        keyed = {layout.names[k]: v for k, v in weights.items()}
        if layout.averaged_count is not None:  # an AveragedModel's state dict: its count too
            keyed = {AVERAGED_COUNT: torch.tensor(layout.averaged_count), **keyed}
        save(keyed, to, metadata, overwrite=output is None or None, entry=layout.entry,
             extras=layout.extras)

    if not bn_layers(net):
        out = None
        if meta.get("bn.stale") == "true":  # an older file marked stale: it is not
            out = os.fspath(output if output is not None else checkpoint)
            write(state, out, {**meta, "bn.stale": "false"})
        return BnFixResult(path, out, 0, 0, 0, data_name, stats, str(dev),
                           time.perf_counter() - t0,
                           "the model has no BatchNorm layers: nothing to recalibrate")
    recorded = None
    if subset is None and split == "train" and data_name == meta.get("data.name"):
        subset = recorded = meta_int(meta, "data.train_images", minimum=0)
    dataset = built.dataset(split, augment=augment)
    if recorded is not None and hasattr(dataset, "__len__") and recorded > len(dataset):
        raise DataError(f"{path}: the run trained on {recorded} images (data.train_images), "
                        f"more than the {len(dataset)} of {data_name}'s {split} split here: "
                        "is it the same data? Pass --bn-images N to choose the images")

    def loader(rank: int = 0, ranks: int = 1):
        """(this rank's loader, a batch limit left to recalibrate: for a user's loader)."""
        def make(limit=None):
            return pass_loader(dataset, batch_size, shuffle=True, seed=seed, workers=workers,
                               subset=subset, limit=limit, rank=rank, ranks=ranks,
                               device=str(dev), subset_option="bn_images")
        made = make()
        n = pass_batches(made)
        limit = batches if fraction is None or n is None else max(1, round(n * fraction))
        if made is dataset or limit is None:
            return made, limit
        return make(limit), None

    net.to(dev)
    if world_size() > 1:  # under torchrun: the ranks share the pass, rank 0 writes
        with Group() as group:
            error, info = None, None
            try:
                made, limit = loader(group.rank, group.size)
                info = recalibrate(net, made, stats=stats, device=dev, max_batches=limit,
                                   input_key=input_key, progress=progress)
            except BaseException as e:
                error = e
            group.agree(error)
            if group.rank != 0:
                return BnFixResult(path, None, info.bn_layers, info.batches,
                                   info.samples, data_name, stats, str(dev),
                                   time.perf_counter() - t0, f"rank {group.rank}: rank 0 writes")
    else:
        made, limit = loader()
        info = recalibrate(net, made, stats=stats, device=dev, max_batches=limit,
                           input_key=input_key, progress=progress)
    out = os.fspath(output if output is not None else checkpoint)
    new_meta = {**meta, "bn.stale": "false", "bn.samples": str(info.samples),
                "bn.data": describe_data(data_name, split, augment, subset),
                "bn.stats": stats}
    new_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    prefix = wrapper_prefix(list(new_state), list(state)) or ""  # the net's names lack it
    write({k: new_state[k[len(prefix):]] for k in state}, out, new_meta)
    result = BnFixResult(path, out, info.bn_layers, info.batches, info.samples,
                         data_name, stats, str(dev), time.perf_counter() - t0)
    trained_on = meta.get("data.name")
    if trained_on and trained_on != data_name:
        result.warnings.append(f"{path} was trained on {trained_on} (data.name) but its "
                               f"BatchNorm statistics are now computed on {data_name}")
    return result


def _check_in_place(path: str, key: str | None, strip_prefix: str | None) -> None:
    """Rewriting a file in place keeps its weights (keyed as stored: prefixes restored),
    metadata and carried configuration: refuse where that would drop anything else
    (optimizer state, loop state)."""
    with open_checkpoint(path, key=key, strip_prefix=strip_prefix) as r:
        carried = r.extras()  # read once: it converts the entries (and their tensors)
        lost = [e for e in r.other_entries if e not in carried]
    if lost:
        raise CkptavgError(f"{path}: rewriting it in place would drop {', '.join(lost[:4])}; "
                           "write the recalibrated weights elsewhere (output, -o OUT)")
