"""The SWA window search: when should averaging start? Chosen on held-out data.

For each candidate start S (every selected checkpoint), the average of the checkpoints from
S to the last is scored on held-out training images, with BatchNorm recalibrated (see
heldout.py). The candidates share one running float64 sum, built from the last checkpoint
backwards, so each new candidate reads one more checkpoint, not all of them. The test split
is read only with `test=True`, for the chosen window.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptavg.engine.select import close_all, files_of, leave_out_outputs, open_candidates, select
from ckptavg.errors import OptionError
from ckptavg.experiments.plots import pyplot
from ckptavg.io.atomic import AtomicFile
from ckptavg.options import (
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
)
from ckptavg.results import Progress, Result
from ckptavg.selection.heldout import RunningSum, open_heldout, write_choice


@dataclass
class Window(Result):
    """The average of the checkpoints from `start` to the last one, and its held-out score."""

    start: str
    start_epoch: int | None
    n: int
    holdout_accuracy: float
    holdout_loss: float


@dataclass
class SearchResult(Result):
    """Every window (earliest start first), the chosen one, and where things were written."""

    windows: list[Window]
    best: Window
    end: str  # the last checkpoint, common to every window
    output: str | None
    plot: str | None
    holdout: str
    holdout_samples: int
    bn_recalibrated: bool
    passes: int
    seconds: float
    test_accuracy: float | None = None
    test_loss: float | None = None
    warnings: list[str] = field(default_factory=list)
    # whether the held-out images are known not to be trained on (data.train_images)
    holdout_verified: bool = True


def search(inputs: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, *,
           plot: str | os.PathLike | None = None, selection: Selection | None = None,
         heldout: HeldOutOptions | None = None, model: ModelOptions | str | None = None,
         data: DataOptions | str | None = None, loader: LoaderOptions | None = None,
         reading: Reading | None = None, test: bool = False,
           progress: Progress | None = None) -> SearchResult:
    """Score the average from each candidate start to the last checkpoint on held-out data.

    Args:
        inputs: one run's checkpoints (paths or globs), ordered by epoch as `average` does.
        output: write the best window's average here (BatchNorm recalibrated as scored).
        plot: write a PNG of held-out accuracy against the start epoch (needs matplotlib).
        selection: which checkpoints take part (`Selection`, as for `average`); with
            `every` or `cycle_ends` the windows are made of cycle ends.
        heldout, model, data, loader, reading, test: as for `soup`.
        progress: called with (windows scored, windows in all).

    Returns:
        A SearchResult; the best window has the highest held-out accuracy (then the lower
        held-out loss, then more checkpoints).

    Example:
        >>> r = ckptavg.search(["runs/a/epoch-*.safetensors"], "best.safetensors",
        ...                    heldout=ckptavg.HeldOutOptions(bn_batches=1))
        >>> [w.start_epoch for w in r.windows], r.holdout
        ([1, 2, 3, 4, 5, 6], 'fashion-mnist:train[5000:6000]')
    """
    t0 = time.perf_counter()
    output = os.fspath(output) if output is not None else None
    plot = os.fspath(plot) if plot is not None else None
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise OptionError("plot", "the plot is a PNG file; name it .png", plot)
        pyplot()  # without matplotlib, fail before the long measurement, not after it
    cands = open_candidates([os.fspath(p) for p in inputs], Reading.of(reading).key,
                            Reading.of(reading).strip_prefix)
    try:
        kept, left_out = leave_out_outputs(cands)
        pool = select(kept, selection)
        held = open_heldout(pool, output, files_of(cands), heldout=heldout, model=model, data=data,
                            loader=loader)
        running, windows = RunningSum(), []
        best, best_state, best_scores, best_i = None, None, None, 0
        for i in reversed(range(len(pool))):
            c = pool[i]
            running.add(RunningSum.read(c.reader), i)
            mean = running.mean()
            s = held.score(mean, f"the average from {c.path}")
            w = Window(c.path, c.epoch, running.n, s.accuracy, s.loss)
            windows.append(w)
            # Later starts come first: an equal score moves the choice to more checkpoints.
            if best is None or (s.accuracy, -s.loss) >= (best_scores.accuracy,
                                                                -best_scores.loss):
                best, best_state, best_scores, best_i = w, held.fixed(mean), s, i
            if progress:
                progress(len(windows), len(pool))
        windows.reverse()
        result = SearchResult(windows, best, pool[-1].path, output, plot, held.description,
                              best_scores.samples, held.has_bn, held.passes, 0.0)
        result.warnings += left_out + held.warnings
        result.holdout_verified = held.verified
        if test:
            t = held.test(best_state)
            result.test_accuracy, result.test_loss = t.accuracy, t.loss
        if output is not None:
            write_choice(output, pool[best_i:], best_state, held,
                         {"select.method": "window-search",
                          "select.holdout_accuracy": f"{best.holdout_accuracy:.4f}",
                          **({"select.start_epoch": str(best.start_epoch)}
                             if best.start_epoch is not None else {})})
        if plot is not None:
            plot_search(result, plot)
    finally:
        close_all(cands)
    result.seconds = time.perf_counter() - t0
    return result


def plot_search(result: SearchResult, path: str) -> None:
    """Held-out accuracy of each window against its start (epoch, else position)."""
    plt = pyplot()
    ws = result.windows
    by_epoch = all(w.start_epoch is not None for w in ws)
    xs = [w.start_epoch if by_epoch else i + 1 for i, w in enumerate(ws)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [w.holdout_accuracy for w in ws], "o-", label="average from start to the end")
    b = ws.index(result.best)
    ax.plot([xs[b]], [ws[b].holdout_accuracy], "r*", markersize=14, label="chosen")
    ax.set_xlabel("first epoch averaged" if by_epoch else "first checkpoint averaged")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"windows ending at {os.path.basename(result.end)}\nheld out: {result.holdout}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with AtomicFile(path) as out:
        fig.savefig(out.file, dpi=120, format="png")
    plt.close(fig)
