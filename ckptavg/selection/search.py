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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptavg.errors import OptionError
from ckptavg.io.atomic import AtomicFile
from ckptavg.options import (
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
)
from ckptavg.plots import pyplot
from ckptavg.results import Progress, Result
from ckptavg.selection.heldout import ChoiceResult, Choosing, RunningSum

if TYPE_CHECKING:
    from ckptavg.selection.profile_search import ProfileSearchResult


@dataclass
class Window(Result):
    """The average of the checkpoints from `start` to the last one, and its held-out score."""

    start: str
    start_epoch: int | None
    n: int
    holdout_accuracy: float
    holdout_loss: float
    end: str = ""  # the window's newest checkpoint (a sweep's windows end at each in turn)
    end_epoch: int | None = None


@dataclass
class SearchResult(ChoiceResult):
    """Every window (earliest start first), the chosen one, and the plot; where the choice
    was written, the held-out images and the rest are `ChoiceResult`'s."""

    windows: list[Window]
    best: Window
    end: str  # the last checkpoint, common to every window
    plot: str | None = None
    sweep: str | None = None  # windows of a fixed size sliding along the run (`sweep`)


def search(inputs: Sequence[str | os.PathLike], output: str | os.PathLike | None = None, *,
           plot: str | os.PathLike | None = None, selection: Selection | None = None,
         heldout: HeldOutOptions | None = None, model: ModelOptions | str | None = None,
         data: DataOptions | str | None = None, loader: LoaderOptions | None = None,
         reading: Reading | None = None, test: bool = False, sweep: str | None = None,
           profiles: Sequence[str] | None = None,
           progress: Progress | None = None) -> SearchResult | ProfileSearchResult:
    """Score the average from each candidate start to the last checkpoint on held-out data.

    Args:
        inputs: one run's checkpoints (paths or globs), ordered by epoch as `average` does.
        output: write the best window's average here (BatchNorm recalibrated as scored).
        plot: write a PNG of held-out accuracy against the start epoch (needs matplotlib).
        selection: which checkpoints take part (`Selection`, as for `average`); with
            `every` or `cycle_ends` the windows are made of cycle ends.
        heldout, model, data, loader, reading, test: as for `soup`.
        sweep: "window=W[,stride=S]" (as for `average`): score windows of W checkpoints (or
            W tokens) sliding along the run instead, each input read once; the plot is the
            held-out score against the window's end (MaP's merged curve).
        profiles: score these averaging profiles of the selection instead of windows
            (`search_profiles`; its result), e.g. ["uniform", "ema:halflife=5"].
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
    if profiles is not None:
        for name, value in (("plot", plot), ("sweep", sweep)):
            if value is not None:
                raise OptionError((name, "profiles"), f"{name} goes with the window search; "
                                  "profiles are scored without it")
        from ckptavg.selection.profile_search import search_profiles

        return search_profiles(inputs, list(profiles), output, selection=selection,
                               heldout=heldout, model=model, data=data, loader=loader,
                               reading=reading, test=test, progress=progress)
    plot = os.fspath(plot) if plot is not None else None
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise OptionError("plot", "the plot is a PNG file; name it .png", plot)
        pyplot()  # without matplotlib, fail before the long measurement, not after it
    with Choosing(inputs, output, reading=reading, selection=selection, heldout=heldout,
                  model=model, data=data, loader=loader, test=test) as frame:
        if sweep is not None:
            result = _sweep(frame, sweep, plot, progress)
        else:
            result = _starts(frame, plot, progress)
        if plot is not None:
            plot_search(result, plot)
            result.seconds = time.perf_counter() - frame.t0
    return result


def _starts(frame: Choosing, plot: str | None, progress: Progress | None) -> SearchResult:
    """Every start to the last checkpoint: one running float64 sum, built from the last
    checkpoint backwards, so each window reads one more checkpoint."""
    pool = frame.pool
    running, windows, best, best_i = RunningSum(), [], None, 0
    for i in reversed(range(len(pool))):
        c = pool[i]
        running.add(RunningSum.read(c.reader), i)
        mean = running.mean()
        s = frame.score(mean, f"the average from {c.path}")
        windows.append(Window(c.path, c.epoch, running.n, s.accuracy, s.loss))
        # Later starts come first: an equal score moves the choice to more checkpoints.
        if frame.offer(s, mean, tie=True):
            best, best_i = windows[-1], i
        if progress:
            progress(len(windows), len(pool))
    windows.reverse()
    result = SearchResult(windows=windows, best=best, end=pool[-1].path, plot=plot)
    return frame.finish(result, pool[best_i:],
                        {"select.method": "window-search",
                         "select.holdout_accuracy": f"{best.holdout_accuracy:.4f}",
                         **({"select.start_epoch": str(best.start_epoch)}
                            if best.start_epoch is not None else {})})


def _sweep(frame: Choosing, spec: str, plot: str | None,
           progress: Progress | None) -> SearchResult:
    """Windows of a fixed size along the run, each input read once: every open window's
    float64 sum takes it (as `average --sweep`); each is scored as it closes."""
    from ckptavg.engine import sweep as sweeps

    pool = frame.pool
    spans = sweeps.windows(sweeps.parse(spec), pool)
    open_sums: dict[int, RunningSum] = {}
    windows: list[Window] = []
    best, best_span = None, spans[0]
    for i, c in enumerate(pool):
        holding = [j for j, (a, b) in enumerate(spans) if a <= i <= b]
        if not holding:
            continue
        state = RunningSum.read(c.reader)
        for j in holding:
            open_sums.setdefault(j, RunningSum()).add(state, i)
        for j in [j for j in holding if spans[j][1] == i]:
            a, b = spans[j]
            mean = open_sums.pop(j).mean()
            s = frame.score(mean, f"the average of {pool[a].path} .. {c.path}")
            windows.append(Window(pool[a].path, pool[a].epoch, b - a + 1, s.accuracy, s.loss,
                                  c.path, c.epoch))
            # a later window wins a tie: the newest weights for the same score
            if frame.offer(s, mean, tie=True):
                best, best_span = windows[-1], (a, b)
            if progress:
                progress(len(windows), len(spans))
    result = SearchResult(windows=windows, best=best, end=pool[-1].path, plot=plot, sweep=spec)
    a, b = best_span
    return frame.finish(result, pool[a:b + 1],
                        {"select.method": "window-sweep", "select.sweep": spec,
                         "select.holdout_accuracy": f"{best.holdout_accuracy:.4f}"})


def plot_search(result: SearchResult, path: str) -> None:
    """Held-out accuracy of each window against its start (epoch, else position)."""
    plt = pyplot()
    ws = result.windows
    swept = result.sweep is not None
    epochs = [w.end_epoch if swept else w.start_epoch for w in ws]
    by_epoch = all(e is not None for e in epochs)
    xs = [epochs[i] if by_epoch else i + 1 for i in range(len(ws))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [w.holdout_accuracy for w in ws], "o-",
            label=f"average of the window ({result.sweep})" if swept
            else "average from start to the end")
    b = ws.index(result.best)
    ax.plot([xs[b]], [ws[b].holdout_accuracy], "r*", markersize=14, label="chosen")
    what = "last" if swept else "first"
    ax.set_xlabel(f"{what} epoch averaged" if by_epoch else f"{what} checkpoint averaged")
    ax.set_ylabel("held-out accuracy (%)")
    title = ("windows sliding along the run" if swept
             else f"windows ending at {os.path.basename(result.end)}")
    ax.set_title(f"{title}\nheld out: {result.holdout}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with AtomicFile(path) as out:
        fig.savefig(out.file, dpi=120, format="png")
    plt.close(fig)
