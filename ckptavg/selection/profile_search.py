"""Which averaging profile? Each chosen on held-out data, as the window search chooses a start.

Every checkpoint of the selection is read once and folded into one float64 sum per profile,
with that profile's weights (profiles.py, from the checkpoints' steps or epochs); each
profile's average is BatchNorm-recalibrated and scored on the held-out training images
(heldout.py). The best (highest held-out accuracy, then lower loss, then the profile given
first) is written; the test split is read only with `test=True`, for the choice.
Memory: one float64 model per profile, plus one checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ckptavg.engine import profiles
from ckptavg.engine.plan import profile_positions
from ckptavg.errors import OptionError
from ckptavg.options import (
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
)
from ckptavg.results import Progress, Result
from ckptavg.selection.heldout import ChoiceResult, Choosing, RunningSum


@dataclass
class ProfileScore(Result):
    """One profile's weights over the selection and its held-out score."""

    profile: str
    weights: list[float]
    effective_n: float
    holdout_accuracy: float
    holdout_loss: float


@dataclass
class ProfileSearchResult(ChoiceResult):
    """Every profile scored (in the order given) and the chosen one; where it was written,
    the held-out images and the rest are `ChoiceResult`'s."""

    profiles: list[ProfileScore]
    best: ProfileScore
    inputs: list[str]
    positions: list[int]


def search_profiles(inputs: Sequence[str | os.PathLike], specs: Sequence[str],
                    output: str | os.PathLike | None = None, *, selection: Selection | None = None,
         heldout: HeldOutOptions | None = None, model: ModelOptions | str | None = None,
         data: DataOptions | str | None = None, loader: LoaderOptions | None = None,
         reading: Reading | None = None, test: bool = False,
                    progress: Progress | None = None) -> ProfileSearchResult:
    """Score each averaging profile of one run's checkpoints on held-out data.

    Args:
        inputs: one run's checkpoints (paths or globs), ordered by step or epoch.
        specs: profile specs (profiles.py), e.g. ["uniform", "ema:halflife=5",
            "power:sigma_rel=0.1", "wsm:minus-sqrt"].
        output: write the best profile's average here (BatchNorm recalibrated as scored).
        selection, heldout, model, data, loader, reading, test: as for `search`.
        progress: called with (profiles scored, profiles in all).

    Returns:
        A ProfileSearchResult.

    Example:
        >>> r = ckptavg.search_profiles(["runs/a/epoch-*.safetensors"],
        ...                             ["uniform", "ema:halflife=2"],
        ...                             selection=ckptavg.Selection(from_epoch=3),
        ...                             heldout=ckptavg.HeldOutOptions(bn_batches=1))
        >>> [p.profile for p in r.profiles], r.positions
        (['uniform', 'ema:halflife=2'], [3, 4, 5, 6])
    """
    parsed = [profiles.parse(s) for s in specs]
    if not parsed:
        raise OptionError("profiles", "none given; name one or more, e.g. uniform,wsm:linear")
    with Choosing(inputs, output, reading=reading, selection=selection, heldout=heldout,
                  model=model, data=data, loader=loader, test=test) as frame:
        pool = frame.pool
        positions = profile_positions(pool)
        ws = [profiles.weights(p, positions) for p in parsed]
        sums = [RunningSum() for _ in parsed]
        for i, c in enumerate(pool):
            state = RunningSum.read(c.reader)
            for s, w in zip(sums, ws):
                s.add(state, i, w[i])
        scored, best = [], None
        for j, (p, s) in enumerate(zip(parsed, sums)):
            mean = s.mean()
            r = frame.score(mean, f"the {p.spec} average")
            scored.append(ProfileScore(p.spec, ws[j], profiles.effective_n(ws[j]),
                                       r.accuracy, r.loss))
            if frame.offer(r, mean):  # a tie keeps the profile given first
                best = scored[-1]
            sums[j] = None  # its float64 model is no longer needed
            if progress:
                progress(j + 1, len(parsed))
        result = ProfileSearchResult(profiles=scored, best=best, inputs=[c.path for c in pool],
                                     positions=positions)
        return frame.finish(result, pool,
                            {"select.method": "profile-search",
                             "select.holdout_accuracy": f"{best.holdout_accuracy:.4f}",
                             "select.profiles": ";".join(p.spec for p in parsed)},
                            weights=best.weights, profile=best.profile)
