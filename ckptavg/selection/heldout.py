"""Choosing what to average with held-out data: the split, the scoring pass, running sums.

`soup` and `search` score many candidate averages of one run's checkpoints. Every candidate
goes through the same `HeldOut.score`: its weights are loaded into one network, BatchNorm is
recalibrated on the training images (same seed, same batches, same augmentation for every
candidate, so they are compared on equal terms), and it is scored on held-out training
images, never on the test split. `RunningSum` keeps float64 sums so that growing sets of
checkpoints cost one read per checkpoint. `Choosing` is the frame every such choice runs
in (open, select, held out, score, keep the best, test, write, close) and `ChoiceResult`
the fields every choice reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ckptavg.engine import arith
from ckptavg.engine.plan import make_plan
from ckptavg.engine.prepare import protected_files
from ckptavg.engine.select import (
    Candidate,
    close_all,
    leave_out_outputs,
    open_candidates,
    select,
)
from ckptavg.errors import CkptavgError, DataError, OptionError
from ckptavg.io import ReaderBase
from ckptavg.io.checkpoint import save
from ckptavg.io.dtypes import dtype_of
from ckptavg.io.metadata import meta_int
from ckptavg.io.outputs import check_output, output_kind
from ckptavg.nn.bn import bn_layers, recalibrate
from ckptavg.nn.build import load_weights, network_for, wrapper_prefix
from ckptavg.nn.data import describe_data, holdout_split, make_loader
from ckptavg.nn.device import resolve_device
from ckptavg.nn.evaluation import Scores, predict, scores
from ckptavg.options import (
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
    Stats,
    check_choice,
)
from ckptavg.results import Result


def _round_once(mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 mean rounded once to `dtype`, as `average` rounds it (torch's `.to()` goes
    through float32 on the way to bfloat16/float16, rounding twice)."""
    if dtype in (torch.float64, torch.float32):
        return mean.to(dtype)
    raw = arith.round_once(mean.detach().cpu().numpy(), dtype_of(dtype))
    return torch.from_numpy(raw).view(dtype).view(mean.shape)


class RunningSum:
    """The float64 sum of checkpoints added one at a time, and the mean of what is in it.

    The mean is the float64 sum divided by the count and rounded once to each tensor's dtype:
    what `average` computes for the same set. Integer and bool tensors are not averaged: the
    value of the checkpoint latest in training order is kept (as `average` does).
    Memory: the model in float64 plus one checkpoint."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: dict[str, tuple[int, torch.Tensor]] = {}  # key -> (order, value)
        self.dtypes: dict[str, torch.dtype] = {}
        self.n = 0
        self.total = 0.0  # the sum of the weights added

    @staticmethod
    def read(reader: ReaderBase) -> dict[str, torch.Tensor]:
        """Every tensor of a checkpoint, copied out of its mapped file."""
        out = {}
        for k in reader.keys():
            out[k] = reader.read(k).clone()
            reader.release(k)
        return out

    def add(self, state: dict[str, torch.Tensor], order: int, weight: float = 1.0) -> None:
        """Fold in one checkpoint with `weight` (multiplied, then added, as `average` does);
        `order` is its place in training (later wins for integers)."""
        for k, t in state.items():
            if t.dtype.is_floating_point:
                x = t.to(torch.float64) if weight == 1.0 else t.to(torch.float64) * weight
                if k in self.sums:
                    self.sums[k].add_(x)
                else:  # never the caller's tensor itself (a float64 .to() returns it)
                    self.sums[k] = x.clone() if x is t else x
                self.dtypes[k] = t.dtype
            elif k not in self.kept or order >= self.kept[k][0]:
                self.kept[k] = (order, t)
        self.n += 1
        self.total += weight

    def mean(self, extra: dict[str, torch.Tensor] | None = None,
             extra_order: int = -1) -> dict[str, torch.Tensor]:
        """The mean of the checkpoints in the sum, and of `extra` too when given (without
        adding it)."""
        n = self.total + (extra is not None)
        if self.n + (extra is not None) == 0:
            raise ValueError("the mean of nothing")
        out: dict[str, torch.Tensor] = {}
        keys = self.sums.keys() | self.kept.keys() if self.n else extra.keys()
        for k in keys:
            if k in self.sums or (extra is not None and extra[k].dtype.is_floating_point):
                s = self.sums.get(k)
                if extra is not None:
                    s = extra[k].to(torch.float64) if s is None else s + extra[k].to(torch.float64)
                dtype = self.dtypes.get(k, extra[k].dtype if extra is not None else None)
                out[k] = _round_once(s / n, dtype)
            else:
                order, value = self.kept.get(k, (-1, None))
                if extra is not None and (value is None or extra_order >= order):
                    value = extra[k]
                out[k] = value
        return out


class HeldOut:
    """The network, the training images (for BatchNorm) and the held-out images of one
    selection, and the one scoring pass every candidate goes through.

    The held-out images are the last `holdout` of the first `train_images` training images, as
    `train --holdout` splits them; by default both come from the checkpoints' metadata
    (`data.holdout`, `data.train_images`). Held-out images that a run trained on are
    refused. The test split is read only by `test`, after the choice is made."""

    def __init__(self, ref: Candidate, *, heldout: HeldOutOptions | None = None,
                 model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
                 loader: LoaderOptions | None = None) -> None:
        h = HeldOutOptions.of(heldout)
        holdout, subset, seed, stats, bn_batches = (h.holdout, h.train_images, h.seed, h.stats,
                                                    h.bn_batches)
        ld = LoaderOptions.of(loader)
        check_choice("stats", stats, Stats)
        meta = ref.metadata
        self.network = network_for(meta, ref.path, model, data)
        self.net, self.data_name = self.network.net, self.network.data
        self.dev = resolve_device(ld.device)
        self.net.to(self.dev)
        self.batch_size, self.workers, self.seed = ld.batch_size, ld.workers, seed
        self.stats, self.bn_batches, self.input_key = stats, bn_batches, ld.input_key
        same_data = meta.get("data.name") == self.data_name
        trained = meta_int(meta, "data.train_images", minimum=0) if same_data else None
        if holdout is None:
            holdout = meta_int(meta, "data.holdout", minimum=0) if same_data else None
            if not holdout:
                raise OptionError("holdout", f"missing: {ref.path} records no held-out "
                                  "images (data.holdout metadata, written by train --holdout); "
                                  "give how many of the last training images (of the first "
                                  "train_images) to hold out", mentions=("train_images",))
        if holdout < 1:
            raise OptionError("holdout", "must be 1 or more", holdout)
        named: tuple[str, ...] = ("train_images",)
        if subset is None and trained is not None:
            subset = trained + holdout  # the split `train --train-images S --holdout N` made
            named = ("holdout", "train_images")
        train_set = self.network.dataset("train", augment=True)
        plain = self.network.dataset("train")
        if isinstance(train_set, torch.utils.data.DataLoader):
            raise DataError(f"data {self.data_name}: gives a DataLoader, which cannot be split "
                            "into training and held-out images; return a Dataset")
        fit, held = holdout_split(len(train_set), subset, holdout, named)
        if trained is not None and held.start < trained:
            raise CkptavgError(
                f"held-out images {held.start}..{held.stop - 1} include images the run trained "
                f"on (the first {trained}, data.train_images of {ref.path}); choosing on them "
                "is not honest: hold out images the run did not see (--holdout, --train-images)")
        if trained is not None:
            fit = range(0, min(trained, fit.stop))
        self.fit, self.held = fit, held
        # Held out for sure only when the run recorded which images it trained on.
        self.verified = trained is not None
        self.warnings: list[str] = [] if self.verified else [
            f"{ref.path}: no data.train_images metadata (the run was not trained by ckptavg "
            f"train on {self.data_name}), so ckptavg cannot know that the held-out images "
            f"{self.description} were not trained on; if they were, the held-out scores are "
            "optimistic and the choice is not honest (hold out images your loop never saw)"]
        self._train_set = torch.utils.data.Subset(train_set, fit)
        self._held = make_loader(torch.utils.data.Subset(plain, held), self.batch_size,
                                 workers=self.workers, device=str(self.dev))
        layers = set(bn_layers(self.net))
        self.has_bn = bool(layers)
        self.bn_keys = {f"{name}.{b}" for name, m in self.net.named_modules() if m in layers
                        for b, _ in m.named_buffers()}
        self.bn_samples = 0
        self.passes = 0

    @property
    def description(self) -> str:
        """The held-out images, as the output's select.holdout metadata says it."""
        return f"{self.data_name}:train[{self.held.start}:{self.held.stop}]"

    @property
    def bn_description(self) -> str:
        return describe_data(self.data_name, "train", True, self.fit.stop)  # as bn_fix

    def _recalibrate(self) -> None:
        # The same batches and augmentations for every candidate: reseed, fresh loader.
        torch.manual_seed(self.seed)
        loader = make_loader(self._train_set, self.batch_size, shuffle=True,
                             workers=self.workers, seed=self.seed, device=str(self.dev))
        info = recalibrate(self.net, loader, stats=self.stats, device=self.dev,
                           max_batches=self.bn_batches, input_key=self.input_key)
        self.bn_samples = info.samples

    def load(self, state: dict[str, torch.Tensor], path: str, recalibrate: bool = True) -> None:
        """Put a candidate's weights into the network and recalibrate its BatchNorm."""
        load_weights(self.net, state, path)
        if self.has_bn and recalibrate:
            self._recalibrate()

    def score(self, state: dict[str, torch.Tensor], path: str, recalibrate: bool = True) -> Scores:
        """Held-out accuracy (%), mean cross-entropy and sample count of `state`, with its
        BatchNorm recalibrated first (unless `recalibrate` is False: its own statistics)."""
        self.load(state, path, recalibrate)
        self.passes += 1
        probs, labels = predict(self.net, self._held, self.dev, self.input_key)
        return scores(probs, labels)

    def fixed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` with the BatchNorm buffers of the network's last recalibration, each in
        the dtype `state` has: the weights that were scored."""
        if not self.has_bn:
            return dict(state)
        now = self.net.state_dict()
        # the state keyed as its checkpoint (a Lightning module's `model.`), the net without
        prefix = wrapper_prefix(list(now), list(state)) or ""
        out = {}
        for k, v in state.items():
            name = k[len(prefix):] if prefix and k.startswith(prefix) else k
            out[k] = now[name].detach().to("cpu", v.dtype, copy=True) \
                if name in self.bn_keys else v
        return out

    def test(self, state: dict[str, torch.Tensor]) -> Scores:
        """Test accuracy of the chosen weights, as scored (BatchNorm as `fixed` left it):
        the only time the test split is read."""
        load_weights(self.net, state, "the chosen weights")
        test_set = self.network.dataset("test")
        loader = make_loader(test_set, self.batch_size, workers=self.workers, device=str(self.dev))
        probs, labels = predict(self.net, loader, self.dev, self.input_key)
        return scores(probs, labels)


def write_choice(output: str, chosen: Sequence[Candidate], state: dict[str, torch.Tensor],
                 heldout: HeldOut, selection: dict[str, str],
                 weights: Sequence[float] | None = None, profile: str | None = None) -> None:
    """Write the chosen average: the metadata of `average` over `chosen` (in training
    order, with `weights` and the `profile` they came from when not uniform), BatchNorm as
    recalibrated for scoring, and what chose it (`select.*`)."""
    plan = make_plan([c.reader for c in chosen],
                     list(weights) if weights is not None else [1.0] * len(chosen),
                     method="profile" if profile else "uniform", profile=profile)
    meta = dict(plan.metadata)
    if heldout.has_bn:
        meta.update({"bn.stale": "false", "bn.samples": str(heldout.bn_samples),
                     "bn.data": heldout.bn_description, "bn.stats": heldout.stats})
    meta.update({"select.holdout": heldout.description,
                 "select.holdout_verified": "true" if heldout.verified else "false", **selection})
    # laid out as `average` lays out the newest input's (its entry, Lightning's version and
    # hyper-parameters...), so the output loads where the inputs load
    save(state, output, meta, entry=plan.entry, extras=plan.extras)


def refuse_quantized(plan, path: str, what: str) -> None:
    """Quantized inputs (FP8, MXFP4) are averaged in what their weights mean by `average`
    only: the running sums here (and SWAG's moments) would sum their codes. One line."""
    if plan.fp8 is not None:
        raise CkptavgError(f"{path}: a quantized checkpoint ({plan.fp8.describe()}); {what} "
                           "would sum its codes apart from their scales, so it is refused: "
                           "dequantize the checkpoints first (`ckptavg average` alone "
                           "averages them as they are)")


def better(s, best, tie: bool = False) -> bool:
    """The one rule of every choice on held-out images (soup, search, profile search): the
    higher held-out accuracy, then the lower held-out loss (`Scores`); on a full tie, `tie`
    says whether the candidate scored now wins (what the caller's order prefers: a window
    search's longer window, a sweep's later window; soups and profiles keep the first)."""
    if best is None:
        return True
    now, before = (s.accuracy, -s.loss), (best.accuracy, -best.loss)
    return now > before or (tie and now == before)


@dataclass(kw_only=True)
class ChoiceResult(Result):
    """What every choice on held-out images reports besides its own fields (soup, search,
    profile search), filled in by `Choosing.finish`. Test figures are None unless asked."""

    output: str | None = None
    holdout: str = ""  # the held-out images, e.g. fashion-mnist:train[15000:20000]
    holdout_samples: int = 0
    bn_recalibrated: bool = False
    passes: int = 0  # scoring passes (one BatchNorm pass and one held-out pass each)
    seconds: float = 0.0
    test_accuracy: float | None = None
    test_loss: float | None = None
    warnings: list[str] = field(default_factory=list)
    # whether the held-out images are known not to be trained on (data.train_images)
    holdout_verified: bool = True


class Choosing:
    """The frame of every choice on held-out images (soup, search, profile search): open
    the inputs (closed by `close`, or leaving a `with`), leave ckptavg's earlier outputs out
    of them and apply the `selection` (in training order), check the output as `average`
    does (it may replace no file of any input opened, but an earlier output of ours at the
    same path that was left out), check that the candidates agree (keys, shapes, dtypes)
    and set up the held-out scoring on the newest (`HeldOut`). The caller
    scores its candidates (`score`), keeps the best by the one rule (`offer`, `better`),
    and ends with `finish`: the shared result fields, the warnings, the test split read
    once for the choice, the chosen average written.

    Attributes: `pool` (the candidates, in training order), `held` (`HeldOut`), `output`."""

    def __init__(self, inputs: Sequence[str | os.PathLike], output: str | os.PathLike | None,
                 *, reading: Reading | None = None, selection: Selection | None = None,
                 heldout: HeldOutOptions | None = None,
                 model: ModelOptions | str | None = None, data: DataOptions | str | None = None,
                 loader: LoaderOptions | None = None, test: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.output = os.fspath(output) if output is not None else None
        self.test = test
        r = Reading.of(reading)
        self.cands = open_candidates([os.fspath(p) for p in inputs], r.key, r.strip_prefix)
        try:
            kept, self.left_out = leave_out_outputs(self.cands)
            self.pool = select(kept, selection)
            if self.output is not None:  # as `average`: no input's file, nothing not ours
                check_output(self.output, output_kind(self.output),
                             protected_files(self.cands, kept, [self.output]))
            plan = make_plan([c.reader for c in self.pool], [1.0] * len(self.pool))  # agree
            refuse_quantized(plan, self.pool[-1].path, "a choice on held-out images")
            self.held = HeldOut(self.pool[-1], heldout=heldout, model=model, data=data,
                                loader=loader)
        except BaseException:
            close_all(self.cands)
            raise
        self.best: Scores | None = None  # the choice so far (`offer`), its weights as scored
        self.best_state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> Choosing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        close_all(self.cands)

    def score(self, state: dict[str, torch.Tensor], label: str) -> Scores:
        """`state`'s held-out scores, its BatchNorm recalibrated first (`HeldOut.score`)."""
        return self.held.score(state, label)

    def offer(self, scores: Scores, state: dict[str, torch.Tensor], tie: bool = False) -> bool:
        """Keep `state` (its BatchNorm as just recalibrated) as the choice when its `scores`
        are `better` than the kept one's; returns whether it was kept."""
        if not better(scores, self.best, tie):
            return False
        self.best, self.best_state = scores, self.held.fixed(state)
        return True

    def finish(self, result: ChoiceResult, chosen: Sequence[Candidate], meta: dict[str, str],
               state: dict[str, torch.Tensor] | None = None, scores: Scores | None = None,
               weights: Sequence[float] | None = None, profile: str | None = None):
        """Fill in `result`'s shared fields for the choice (`state` scored `scores`; default:
        the kept best), its warnings (inputs left out, held-out images not known to be held
        out), the test split read once for the choice only, and write `chosen`'s average
        (`write_choice`, with `meta` saying what chose it) when there is an output."""
        state = self.best_state if state is None else state
        scores = self.best if scores is None else scores
        held = self.held
        result.output, result.holdout = self.output, held.description
        result.holdout_samples, result.bn_recalibrated = scores.samples, held.has_bn
        result.warnings += self.left_out + held.warnings
        result.holdout_verified = held.verified
        if self.test:
            t = held.test(state)
            result.test_accuracy, result.test_loss = t.accuracy, t.loss
        result.passes = held.passes
        if self.output is not None:
            write_choice(self.output, chosen, state, held, meta, weights, profile)
        result.seconds = time.perf_counter() - self.t0
        return result
