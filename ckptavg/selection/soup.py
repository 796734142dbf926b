"""Model soups (Wortsman et al. 2022): which checkpoints to average, chosen on held-out data.

The greedy soup scores every checkpoint on held-out training images, sorts them best
first, starts the soup with the best, and adds each next one only if the held-out accuracy of
the new average is strictly higher: one pass, as in the paper. The uniform soup averages
them all. Every candidate (single checkpoint or average) has its BatchNorm recalibrated on
the training images before it is scored (see heldout.py); the test split is read only with
`test=True`, for the final soup.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ckptavg.options import (
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
)
from ckptavg.results import Progress, Result
from ckptavg.selection.heldout import ChoiceResult, Choosing, RunningSum


@dataclass
class Ingredient(Result):
    """One checkpoint of a soup: its own held-out score, and whether it went in."""

    path: str
    epoch: int | None
    holdout_accuracy: float
    holdout_loss: float
    accepted: bool
    # Greedy: the held-out accuracy of the soup with this checkpoint added (the first is
    # the soup's seed); uniform: None.
    soup_accuracy: float | None = None


@dataclass
class SoupResult(ChoiceResult):
    """What a soup chose and how it scored. `ingredients` are best first (by held-out
    accuracy); `chosen` is the soup in training order. The held-out images, passes, test
    figures and warnings are `ChoiceResult`'s."""

    method: str  # greedy | uniform
    ingredients: list[Ingredient]
    chosen: list[str]
    holdout_accuracy: float
    holdout_loss: float


def soup(inputs: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, *,
         uniform: bool = False, heldout: HeldOutOptions | None = None,
         model: ModelOptions | str | None = None,
         data: DataOptions | str | None = None, loader: LoaderOptions | None = None,
         reading: Reading | None = None, test: bool = False,
         progress: Progress | None = None) -> SoupResult:
    """A greedy (or uniform) soup of checkpoints, chosen on held-out training images.

    Args:
        inputs: checkpoint paths or glob patterns of one architecture.
        output: where to write the soup (any output `average` writes); None: only report.
        uniform: average every input instead of the greedy choice.
        heldout: the held-out images and the BatchNorm pass before each score
            (`HeldOutOptions`): the last `holdout` of the first `train_images` training
            images, as `train --train-images --holdout` split them; default: the
            checkpoints' data.holdout / data.train_images metadata. Held-out images the run
            trained on are refused. The same batches recalibrate every candidate.
        model, data: the network and the data set (`ModelOptions`, `DataOptions`, or just
            a name); default: the checkpoints' model.* and data.name metadata.
        loader: batch size, workers, dict-batch input key and device (`LoaderOptions`).
        reading: where the weights are in training checkpoints (`Reading`).
        test: score the final soup on the test split (read only then).
        progress: called with (scoring passes done, passes in all).

    Returns:
        A SoupResult.

    Example:
        >>> r = ckptavg.soup(["runs/a/epoch-*.safetensors"], "soup.safetensors",
        ...                  heldout=ckptavg.HeldOutOptions(bn_batches=1))
        >>> r.method, r.holdout_samples, 1 <= len(r.chosen) <= 6
        ('greedy', 1000, True)
    """
    with Choosing(inputs, output, reading=reading, heldout=heldout,
                  model=model, data=data, loader=loader, test=test) as frame:
        cands, held = frame.pool, frame.held
        n = len(cands)
        total = n + (1 if uniform else n - 1)
        tick = (lambda: progress(held.passes, total)) if progress else (lambda: None)

        # Every checkpoint alone, keeping the recalibrated weights of the best so far.
        singles = []
        for c in cands:
            x = RunningSum.read(c.reader)
            singles.append(held.score(x, c.path))
            tick()
            frame.offer(singles[-1], x)
        ranked = sorted(range(n), key=lambda i: (-singles[i].accuracy, singles[i].loss, i))
        ingredients = {i: Ingredient(cands[i].path, cands[i].epoch, singles[i].accuracy,
                                     singles[i].loss, uniform) for i in range(n)}

        if uniform:
            total_sum = RunningSum()
            for i, c in enumerate(cands):
                total_sum.add(RunningSum.read(c.reader), i)
            mean = total_sum.mean()
            current = held.score(mean, "the uniform soup")
            tick()
            state, chosen = held.fixed(mean), list(range(n))
        else:
            first = ranked[0]
            running = RunningSum()
            running.add(RunningSum.read(cands[first].reader), first)
            current, state, chosen = singles[first], frame.best_state, [first]
            ingredients[first].accepted = True
            ingredients[first].soup_accuracy = current.accuracy
            for i in ranked[1:]:
                x = RunningSum.read(cands[i].reader)
                candidate = running.mean(extra=x, extra_order=i)
                s = held.score(candidate, f"the soup with {cands[i].path}")
                tick()
                ingredients[i].soup_accuracy = s.accuracy
                if s.accuracy > current.accuracy:  # strictly higher, as the paper
                    running.add(x, i)
                    current, state = s, held.fixed(candidate)
                    chosen.append(i)
                    ingredients[i].accepted = True
            chosen.sort()
        method = "uniform" if uniform else "greedy"
        result = SoupResult(method=method, ingredients=[ingredients[i] for i in ranked],
                            chosen=[cands[i].path for i in chosen],
                            holdout_accuracy=current.accuracy, holdout_loss=current.loss)
        return frame.finish(result, [cands[i] for i in chosen],
                            {"select.method": f"{method}-soup",
                             "select.holdout_accuracy": f"{current.accuracy:.4f}"},
                            state=state, scores=current)
