"""Commands that run a stored network over data: bn-fix, eval, ensemble, soup, search."""

from __future__ import annotations

import click

from ckptavg import options
from ckptavg.cli.app import cli
from ckptavg.cli.options import (
    bn_batches_option,
    deprecated_alias,
    eval_images_option,
    from_fields,
    output_option,
    output_options,
    resolve_alias,
    samples_option,
    seed_option,
    split_option,
    stats_option,
)
from ckptavg.cli.output import emit, progress_bar, reports
from ckptavg.options import (
    WINDOW,
    DataOptions,
    HeldOutOptions,
    LoaderOptions,
    ModelOptions,
    Reading,
    Selection,
)

_FROM_META = {"model": " (default: the checkpoint's model.arch metadata)",
              "data": " (default: the checkpoint's data.name metadata)"}


def network_options(fn):
    """Where the weights are, the model, the data, the loader, --json and -q: what every
    command that runs a stored network over data takes."""
    for d in reversed([from_fields(Reading, "reading"),
                       from_fields(ModelOptions, "model", help_suffix=_FROM_META),
                       from_fields(DataOptions, "data", help_suffix=_FROM_META),
                       from_fields(LoaderOptions, "loader"), output_options]):
        fn = d(fn)
    return fn


@cli.command("bn-fix")
@click.argument("checkpoint")
@output_option("Where to write (default: the checkpoint, atomically in place).")
@network_options
@stats_option
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Use the training transforms for the pass (as the SWA paper).")
@click.option("--split", type=click.Choice(options.choices(options.Split)), default="train",
              show_default=True, help="The images of the pass.")
@click.option("--batches", type=click.IntRange(min=1), help="Use only this many batches.")
@click.option("--fraction", type=float, help="Use only this share of the batches (0-1].")
@click.option("--bn-images", type=click.IntRange(min=1), help="Use only the first N images "
              "(default: the images the run trained on, from data.train_images metadata).")
@deprecated_alias("--subset", "--bn-images", "bn_images", type=click.IntRange(min=1))
@seed_option
def bn_fix_cmd(checkpoint, as_json, quiet, **kwargs):
    """Recompute BatchNorm statistics of an averaged checkpoint with one data pass.

    The model is rebuilt from the checkpoint's model.* metadata unless --model is given;
    the output is keyed and laid out as the input (a Lightning .ckpt stays one).

    \b
    Examples:
      ckptavg bn-fix swa.safetensors                  # a `ckptavg train` run: all from metadata
      ckptavg bn-fix swa.pt --model mymodels:build --data mydata:train_set -o swa-bn.pt
      ckptavg bn-fix swa.ckpt --model timm:resnet18 --data cifar10 --data-dir ~/data -o fixed.ckpt
    """
    from ckptavg.nn.bn import bn_fix

    resolve_alias(kwargs, "--subset", "--bn-images", "bn_images")
    with progress_bar(quiet or as_json, "bn-fix", unit="batch") as bar:
        result = bn_fix(checkpoint, progress=bar, **kwargs)
    if not reports():
        return
    emit(result, as_json, quiet, lambda r: [
        f"{checkpoint}: {r.message}" if r.bn_layers == 0 else
        f"recalibrated {r.bn_layers} BatchNorm layers on {r.samples} samples ({r.batches} "
        f"batches, {r.stats}, {r.device}) in {r.seconds:.1f} s -> {r.output}"])


@cli.command("eval")
@click.argument("checkpoints", nargs=-1, metavar="CHECKPOINT")
@network_options
@split_option
@eval_images_option
@click.option("--swag", "swag_path", help="A file written by `ckptavg swag`: score its Bayesian "
              "model average and the SWA mean (CHECKPOINTS, if any, are scored beside them).")
@samples_option
@click.option("--scale", type=click.FloatRange(min=0), default=options.SWAG_SCALE, show_default=True,
              help="With --swag: covariance scale of the samples (0: the SWA mean).")
@click.option("--diag", is_flag=True, help="With --swag: SWAG-diagonal (no low-rank part).")
@stats_option
@bn_batches_option
@seed_option
@click.option("--plot", help="With --swag: write a reliability diagram (PNG).")
def eval_cmd(checkpoints, as_json, quiet, swag_path, samples, scale, diag, stats, bn_batches,
             seed, plot, reading, **kwargs):
    """Accuracy and mean cross-entropy of one CHECKPOINT on a data split.

    With --swag FILE, SWAG's accuracy, NLL and expected calibration error (15 bins) beside
    the SWA mean's and those of any checkpoints given (e.g. the final SGD weights; none is
    needed).

    \b
    Examples:
      ckptavg eval swa-bn.safetensors --json
      ckptavg eval swa-bn.pt --model mymodels:build --data mydata:test_set --eval-images 1000
      ckptavg eval --swag swag.safetensors runs/epoch-0300.safetensors --plot rel.png
    """
    resolve_alias(kwargs, "--subset", "--eval-images", "eval_images")
    if swag_path is None:
        if len(checkpoints) != 1 or plot is not None:
            raise click.UsageError("give one CHECKPOINT (or --swag FILE and any checkpoints to "
                                   "compare; --plot goes with --swag)")
        from ckptavg.nn.evaluation import evaluate

        with progress_bar(quiet or as_json, "eval", unit="batch") as bar:
            result = evaluate(checkpoints[0], reading=reading, progress=bar, **kwargs)
        if not reports():
            return
        emit(result, as_json, quiet, lambda r: [
            f"{checkpoints[0]}: {r.data} {r.split}: accuracy {r.accuracy:.2f} %, loss "
            f"{r.loss:.4f}, {r.samples} samples"])
        return
    from ckptavg.selection.swag import evaluate_swag

    for name in ("key", "strip_prefix"):
        if getattr(reading, name) is not None:
            raise click.UsageError(f"--{name.replace('_', '-')} does not go with --swag")
    with progress_bar(quiet or as_json, "swag", unit="pass") as bar:
        result = evaluate_swag(swag_path, list(checkpoints), samples=samples, scale=scale,
                               diag=diag, stats=stats, bn_batches=bn_batches, seed=seed,
                               plot=plot, progress=bar, **kwargs)
    emit(result, as_json, quiet, _swag_eval_lines)


@cli.command("ensemble")
@click.argument("checkpoints", nargs=-1, required=True)
@network_options
@split_option
@eval_images_option
def ensemble_cmd(checkpoints, as_json, quiet, **kwargs):
    """Accuracy and loss of the prediction ensemble (mean softmax) of CHECKPOINTS.

    This is what SWA approximates at the cost of one model. Globs are expanded.
    """
    from ckptavg.experiments.ensemble import ensemble
    from ckptavg.io.sources import expand

    resolve_alias(kwargs, "--subset", "--eval-images", "eval_images")
    with progress_bar(quiet or as_json, "ensemble", unit="model") as bar:
        result = ensemble(expand(list(checkpoints)), progress=bar, **kwargs)
    emit(result, as_json, quiet, lambda r: [
        *(f"  {m.accuracy:6.2f} %  {m.checkpoint}" for m in r.members),
        f"ensemble of {r.n}: accuracy {r.accuracy:.2f} %, loss {r.loss:.4f} ({r.samples} samples)"])


# What soup and search share: the held-out split, the BatchNorm pass before each score, and
# the one test evaluation of the final choice.
def heldout_options(fn):
    for d in reversed([from_fields(HeldOutOptions, "heldout"),
                       click.option("--test", is_flag=True, help="Also score the final choice "
                                    "on the test split (read only then, never during "
                                    "selection).")]):
        fn = d(fn)
    return fn


@cli.command("soup")
@click.argument("inputs", nargs=-1, required=True)
@output_option("Write the soup here (.safetensors, .pt, a folder).")
@click.option("--uniform", is_flag=True, help="Average every input (the uniform soup).")
@heldout_options
@network_options
def soup_cmd(inputs, as_json, quiet, **kwargs):
    """Greedy model soup of INPUTS, chosen on held-out training images.

    Scores every checkpoint on the held-out images, then, best first, adds each to the soup
    only if the soup's held-out accuracy rises (Wortsman et al. 2022). BatchNorm is
    recalibrated on the training images before every score.
    """
    from ckptavg.selection.soup import soup

    with progress_bar(quiet or as_json, "soup", unit="score") as bar:
        result = soup(list(inputs), progress=bar, **kwargs)
    emit(result, as_json, quiet, _soup_lines)


@cli.command("search")
@click.argument("inputs", nargs=-1, required=True)
@output_option("Write the best window's average here.")
@click.option("--plot", help="Write held-out accuracy against the start epoch (PNG; with "
              "--sweep, against the window's last epoch).")
@click.option("--sweep", help="window=W[,stride=S]: score windows of W checkpoints (or W "
              "tokens: window=125B) sliding along the run, each input read once, instead of "
              "windows ending at the last checkpoint.")
@click.option("--profiles", help="Score these averaging profiles instead of windows, comma "
              "separated (e.g. uniform,ema:halflife=5,power:sigma_rel=0.1,wsm:minus-sqrt; "
              "see average --profile), and write the best.")
@from_fields(Selection, "selection", only=WINDOW)
@heldout_options
@network_options
def search_cmd(inputs, as_json, quiet, profiles, **kwargs):
    """When should averaging start, or with which profile? Chosen on held-out images.

    Each window's average (from each start to the last checkpoint) is BatchNorm-recalibrated
    and scored on held-out training images; the windows share one running sum, so each reads
    one more checkpoint. With --profiles, each profile's weighted average of the selection is
    scored the same way instead.
    """
    from ckptavg.engine.profiles import split_specs
    from ckptavg.selection.search import search

    if profiles is not None:
        for flag, name in (("--plot", "plot"), ("--sweep", "sweep")):
            if kwargs[name] is not None:  # said as typed, before anything is read
                raise click.UsageError(f"{flag} goes with the window search; it does not go "
                                       "with --profiles")
    with progress_bar(quiet or as_json, "search",
                      unit="profile" if profiles is not None else "window") as bar:
        result = search(list(inputs), progress=bar, profiles=None if profiles is None
                        else split_specs(profiles), **kwargs)
    emit(result, as_json, quiet, _search_lines if profiles is None else _profile_lines)


def _swag_eval_lines(r):
    yield (f"{r.data} {r.split}, {r.rows[0].samples} samples; SWAG: {r.samples} draws, scale "
           f"{r.scale}, seed {r.seed}")
    yield f"  {'':<40} {'accuracy':>9} {'NLL':>8} {'ECE':>7}"
    for row in r.rows:
        yield f"  {row.name:<40} {row.accuracy:8.2f} % {row.nll:8.4f} {row.ece:7.4f}"
    if r.plot:
        yield f"reliability diagram -> {r.plot}"


def _test_line(r):
    if r.test_accuracy is not None:
        yield f"test accuracy of the choice: {r.test_accuracy:.2f} %, loss {r.test_loss:.4f}"


def _soup_lines(r):
    yield f"held-out: {r.holdout} ({r.holdout_samples} images); best first:"
    for g in r.ingredients:
        soup = f"  soup -> {g.soup_accuracy:6.2f} %" if g.soup_accuracy is not None else ""
        yield (f"  {'+' if g.accepted else '-'} {g.holdout_accuracy:6.2f} %{soup}  "
               f"{g.path}")
    dest = f" -> {r.output}" if r.output else ""
    yield (f"{r.method} soup of {len(r.chosen)}: held-out accuracy {r.holdout_accuracy:.2f} %, "
           f"loss {r.holdout_loss:.4f}{dest} ({r.passes} scores, {r.seconds:.1f} s)")
    yield from _test_line(r)


def _profile_lines(r):
    yield (f"held-out: {r.holdout} ({r.holdout_samples} images); {len(r.inputs)} checkpoints "
           f"at positions {r.positions[0]}..{r.positions[-1]}:")
    yield "  profile                          eff. n   held-out acc   loss"
    for p in r.profiles:
        mark = " <- best" if p is r.best else ""
        yield (f"  {p.profile:<30} {p.effective_n:8.2f}   {p.holdout_accuracy:9.2f} %  "
               f"{p.holdout_loss:.4f}{mark}")
    dest = f" -> {r.output}" if r.output else ""
    yield (f"best: {r.best.profile}, held-out accuracy {r.best.holdout_accuracy:.2f} %{dest} "
           f"({r.passes} scores, {r.seconds:.1f} s)")
    yield from _test_line(r)


def _search_lines(r):
    if r.sweep is not None:
        yield from _sweep_search_lines(r)
        return
    yield f"held-out: {r.holdout} ({r.holdout_samples} images); windows ending at {r.end}:"
    yield "  start epoch      n   held-out acc   loss"
    for w in r.windows:
        mark = " <- best" if w is r.best else ""
        epoch = w.start_epoch if w.start_epoch is not None else "?"
        yield f"  {epoch!s:>11} {w.n:>6}   {w.holdout_accuracy:9.2f} %  {w.holdout_loss:.4f}{mark}"
    dest = "".join(f" -> {p}" for p in (r.output, r.plot) if p)
    yield (f"best: from {r.best.start} ({r.best.n} checkpoints), held-out accuracy "
           f"{r.best.holdout_accuracy:.2f} %{dest} ({r.passes} scores, {r.seconds:.1f} s)")
    yield from _test_line(r)


def _sweep_search_lines(r):
    yield f"held-out: {r.holdout} ({r.holdout_samples} images); windows {r.sweep} along the run:"
    yield "  epochs           n   held-out acc   loss"
    for w in r.windows:
        mark = " <- best" if w is r.best else ""
        span = f"{w.start_epoch if w.start_epoch is not None else '?'}-" \
               f"{w.end_epoch if w.end_epoch is not None else '?'}"
        yield f"  {span:<11} {w.n:>6}   {w.holdout_accuracy:9.2f} %  {w.holdout_loss:.4f}{mark}"
    dest = "".join(f" -> {p}" for p in (r.output, r.plot) if p)
    yield (f"best: {r.best.start} .. {r.best.end} ({r.best.n} checkpoints), held-out accuracy "
           f"{r.best.holdout_accuracy:.2f} %{dest} ({r.passes} scores, {r.seconds:.1f} s)")
    yield from _test_line(r)
