"""The `ckptavg` command: one Click group, each subcommand one call of the Python API.

This is the only module that prints, draws progress bars or exits. It imports torch only
inside commands, so `ckptavg --help` stays fast; `average` imports it only when a torch
format is read or written (averaging safetensors files never needs it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from contextlib import contextmanager

import click

from ckptavg import __version__, options
from ckptavg.errors import CkptavgError, OptionError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class UserError(click.ClickException):
    """A CkptavgError on its way out: one line on stderr, its exit code (1, or 2 for an
    option's value)."""

    def __init__(self, error: CkptavgError, message: str | None = None):
        super().__init__(message or str(error))
        self.exit_code = error.exit_code


def _as_typed(ctx: click.Context, p: click.Parameter) -> tuple[str, str | None] | None:
    """(the flag as typed, the value typed with it) for option `p`, or None when the command
    line does not give it."""
    typed = ctx.meta.get("ckptavg.argv", [])
    flags = [o for o in p.opts + p.secondary_opts if o.startswith("-")]
    for i, a in enumerate(typed):
        for o in flags:
            if a.startswith(o + "="):
                return o, a[len(o) + 1:]
            if a == o:
                takes_value = isinstance(p, click.Option) and not p.is_flag
                return o, typed[i + 1] if takes_value and i + 1 < len(typed) else None
    return None


def spelled(ctx: click.Context, name: str) -> str:
    """A library parameter as this command's flag: the spelling the user typed (`-o`), else
    every spelling (`-o/--output`); an argument by its metavar (INPUTS)."""
    for p in ctx.command.params:
        if p.name != name:
            continue
        if isinstance(p, click.Argument):
            return p.make_metavar(ctx) if _metavar_takes_ctx() else p.make_metavar()
        found = _as_typed(ctx, p)
        return found[0] if found else "/".join(o for o in p.opts + p.secondary_opts
                                               if o.startswith("-"))
    return "--" + name.replace("_", "-")


def typed_value(ctx: click.Context, name: str) -> str | None:
    """The value given to option `name` on the command line, as typed (None if not given)."""
    for p in ctx.command.params:
        if p.name == name and isinstance(p, click.Option):
            found = _as_typed(ctx, p)
            return found[1] if found else None
    return None


def _metavar_takes_ctx() -> bool:
    import inspect

    return "ctx" in inspect.signature(click.Argument.make_metavar).parameters


class TorchWhenNeeded(click.Command):
    """A subcommand whose library call imports torch only if it needs it (`average` and
    `inspect` of safetensors files and plain torch files never do), through the same held
    import (io.dtypes.import_torch). An OptionError from the library names the option as
    this command spells it, as a usage error (exit 2)."""

    def parse_args(self, ctx, args):
        ctx.meta["ckptavg.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OptionError as e:
            raise UserError(e, e.render(lambda name: spelled(ctx, name),
                                        lambda name: typed_value(ctx, name))) from None


class Command(TorchWhenNeeded):
    """A subcommand: torch is imported before its body runs, with Ctrl-C and SIGTERM held off
    for the import. A signal that lands inside torch's C++ initialisation would otherwise
    abort the interpreter (pybind11 turns the KeyboardInterrupt into std::terminate, exit
    -6); held off, it is raised as soon as the import is done: exit 130 or 143, one line."""

    def invoke(self, ctx):
        _import_torch_holding_signals()
        return super().invoke(ctx)


def _import_torch_holding_signals() -> None:
    from ckptavg.io.dtypes import import_torch

    import_torch()


class Group(click.Group):
    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptavgError as e:
            raise UserError(e) from None
        except EOFError as e:  # Click would report it as "Aborted!": it is a bug, show it
            raise RuntimeError("unexpected end of input") from e


def parse_size(value: str | None) -> int | None:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912."""
    if value is None:
        return None
    m = _SIZE.match(value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 2GB or 512MiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise click.BadParameter("must be more than 0")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _Bar:
    """A progress callback `(done, total)` over tqdm; `describe(text)` names the current step."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, done: int, total: int) -> None:
        bar = self.bar
        if done < bar.n:  # a new pass (the next epoch): start the bar again
            bar.reset(total=total)
        elif bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text)


class _NoBar:
    def __call__(self, done: int, total: int) -> None:
        return None

    def describe(self, text: str) -> None:
        return None


@contextmanager
def progress_bar(quiet: bool, desc: str, unit: str = "B"):
    """A `_Bar` drawing tqdm on stderr when it is a terminal (nothing otherwise)."""
    if quiet or not sys.stderr.isatty():  # no bar: not even tqdm's import
        yield _NoBar()
        return
    from tqdm import tqdm

    disable = False
    scale = unit == "B"
    bar = tqdm(total=None, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
               disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield _Bar(bar)
    finally:
        bar.close()


def say(message: str) -> None:
    """A line on stderr that does not break an active progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def reports() -> bool:
    """Whether this process prints the result: under torchrun only rank 0 does."""
    return os.environ.get("RANK", "0") == "0"


def emit(result, as_json: bool, quiet: bool, text) -> None:
    """Print a result: its JSON, or `text(result)` lines unless quiet. Warnings go to stderr
    unless quiet (they are in the JSON too)."""
    for w in [] if quiet else getattr(result, "warnings", []):
        click.echo(f"ckptavg: warning: {w}", err=True)
    if as_json:
        emit_json(result.to_dict())
    elif not quiet:
        for line in text(result):
            click.echo(line)


# ------------------------------------------------------------------ option groups (declared once)

def group(*opts):
    """One decorator applying several click options in the order given."""
    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return apply


def _json_kwargs(ctx, param, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(f"{value!r} is not JSON, e.g. '{{\"width\": 64}}'") from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object")
    return out


def _weights(ctx, param, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas, e.g. 1,2,3") from None


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give integers separated by commas, e.g. 1,2,3") from None


def _size(ctx, param, value: str | None) -> int | None:
    return parse_size(value)


def _two_names(ctx, param, value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    names = tuple(x.strip() for x in value.split(","))
    if len(names) != 2 or not all(names):
        raise click.BadParameter(f"{value!r}: give two names, e.g. SGD,SWA")
    return names


JSON_FLAG = "--json"
json_option = click.option(JSON_FLAG, "as_json", is_flag=True, help="Print the result as JSON on stdout.")
output_options = group(json_option,
                       click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."))
input_options = group(
    click.option("--key", help="Entry of a torch checkpoint that holds the weights "
                 "(e.g. state_dict_ema)."),
    click.option("--strip-prefix", help="Remove this prefix from keys (module./_orig_mod. go "
                 "by themselves)."),
)
device_option = click.option("--device", default=options.DEVICE, show_default=True,
                             help="auto, cpu or cuda[:N].")
seed_option = click.option("--seed", type=int, default=options.SEED, show_default=True)
workers_option = click.option("--workers", type=click.IntRange(min=0), default=options.WORKERS,
                              show_default=True, help="DataLoader worker processes.")


def model_options(required: bool = False):
    default = "" if required else " (default: the checkpoint's model.arch metadata)"
    return group(
        click.option("--model", required=required, help="Model name (see `ckptavg models`), "
                     f"torchvision:NAME, timm:NAME or package.module:factory{default}."),
        click.option("--model-kwargs", callback=_json_kwargs,
                     help="JSON keyword arguments for the model factory."),
    )


data_dir_option = click.option("--data-dir", help="Data root (torchvision's root); default "
                               "$CKPTAVG_DATA, else $XDG_CACHE_HOME/ckptavg/data, else ~/.cache/ckptavg/data.")


def data_options(required: bool = False):
    default = "" if required else " (default: the checkpoint's data.name metadata)"
    return group(
        click.option("--data", required=required, help="cifar10, cifar100, fashion-mnist, mnist, "
                     "svhn, imagefolder or package.module:function (looked up in the working "
                     "folder; called with split='train'|'test' and augment=True|False when it "
                     "takes those parameters; returns a Dataset or DataLoader of (input, "
                     f"label) batches){default}."),
        data_dir_option,
        click.option("--download", is_flag=True, help="Download the data set if missing."),
    )


loader_options = group(
    click.option("--batch-size", type=click.IntRange(min=1), default=options.EVAL_BATCH_SIZE,
                 show_default=True),
    workers_option,
    click.option("--input-key", help="Key of the input in dict batches."),
)
# What every command that runs a stored network over data takes.
run_options = group(input_options, model_options(), data_options(), loader_options, device_option,
                    output_options)
split_option = click.option(
    "--split", type=click.Choice(options.choices(options.Split)), default=None,
    help="The data split to score (default: test). A --data package.module:function is "
    "called with split='train'|'test' and augment=True|False when it takes them; one that "
    "takes no split cannot be asked for test images, so say which images it returns.")


# Which of one run's checkpoints take part (average, search).
window_options = group(
    click.option("--from-epoch", type=int, help="Keep inputs from this epoch on (from metadata, "
                 "the checkpoint's own epoch entry, or the name)."),
    click.option("--to-epoch", type=int, help="Keep inputs up to this epoch."),
    click.option("--last", type=int, help="Keep only the last N inputs (after the other filters)."),
    click.option("--every", type=int, help="Keep every K-th input, starting with the first."),
    click.option("--cycle-ends", is_flag=True, help="Keep inputs whose metadata marks a cycle end."),
)
stats_option = click.option("--stats", type=click.Choice(options.choices(options.Stats)),
                            default=options.STATS, show_default=True,
                            help="BatchNorm statistics: update_bn, torch's semantics; exact, "
                            "population statistics.")


# ------------------------------------------------------------------------------------ commands

@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptavg")
def cli() -> None:
    """Stochastic Weight Averaging, offline: average checkpoints, fix BatchNorm, evaluate.

    \b
    ckptavg average runs/a/*.safetensors --from-epoch 126 -o swa.safetensors
    ckptavg bn-fix swa.safetensors --data cifar10
    ckptavg eval swa.safetensors --data cifar10

    Exit codes: 0 success; 1 a problem found in the inputs, the data or the disk; 2 a
    usage error (an option's value out of range, missing or in conflict, named as typed);
    130 interrupted. Each error is one line on stderr (what, where, what to do); with
    --json, stdout also holds {"error": ..., "exit_code": ...}. Warnings go to stderr
    (and into --json's "warnings") unless -q.
    """


@cli.command(cls=TorchWhenNeeded)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output: .safetensors, .pt/.pth/.ckpt/.tar (torch.load "
              "reads it with weights_only=True), .bin (a plain state dict), or a folder (sharded).")
@click.option("--into", type=click.Path(), help="Fold the inputs into this existing average "
              "(running mean from its average.n); written back in place unless -o is given.")
@window_options
@click.option("--from-step", type=int, help="Keep inputs from this training step on.")
@click.option("--to-step", type=int, help="Keep inputs up to this training step.")
@click.option("--best", type=click.IntRange(min=1), help="Keep the N inputs with the best --metric.")
@click.option("--metric", help="Stored score to rank by: a metadata key (train.val_acc) or a "
              "number in the checkpoint (timm's metric).")
@click.option("--lowest", is_flag=True, help="With --best: lower is better (a loss).")
@click.option("--weights", callback=_weights,
              help="Comma-separated weights, one per selected input (normalised).")
@click.option("--ema", type=float, help="Exponential moving average with this decay, as torch's "
              "AveragedModel EMA: the oldest input seeds it, each later one is folded in with "
              "weight 1-decay (so with few inputs the oldest can weigh most).")
@click.option("--profile", help="Weights from where each input was saved (its step, else its "
              "epoch), whatever the spacing: ema:halflife=H, ema:decay=D,per=P, "
              "power:sigma_rel=S (EDM2's power EMA), power:gamma=G, wsm:linear, "
              "wsm:minus-sqrt, wsm:cosine (WSM merge weights), time (by the time each "
              "input stands for), uniform. See docs/profiles.md.")
@input_options
@click.option("--accumulate", type=click.Choice(options.choices(options.Accumulate)),
              default=options.ACCUMULATE, show_default=True, help="Precision of the running sum.")
@click.option("--dtype", type=click.Choice(options.choices(options.OutDtype)),
              help="Output dtype of floating tensors (default: as in the inputs).")
@click.option("--shard-size", callback=_size,
              help="Write a sharded folder with shards of at most this size (e.g. 2GB).")
@click.option("--allow-nonfinite", is_flag=True, help="Average even if an input holds NaN/Inf.")
@click.option("--hash", "hash_inputs", is_flag=True, help="Record each input's sha256 in the metadata.")
@click.option("--threads", type=click.IntRange(min=1), default=options.AVERAGE_THREADS,
              help="Threads for the arithmetic (default: the cores idle at the start, less "
              "the one that reads ahead).")
@click.option("--dcp", is_flag=True, help="Write a torch.distributed.checkpoint folder (new or "
              "empty), as FSDP loads it; held in memory until written (per rank under torchrun).")
@click.option("--dry-run", is_flag=True, help="Check inputs and print the plan; write nothing.")
@output_options
def average(inputs, as_json, quiet, **kwargs):
    """Average checkpoints into one, streaming one tensor at a time.

    INPUTS are files or glob patterns: safetensors files, sharded safetensors folders, DCP
    folders, or torch.save files (.pt .pth .bin .ckpt .tar), ordered by epoch and step
    (metadata, the checkpoint's own entries, or the numbers in their names). Floating
    tensors are averaged in float64; integer tensors keep the newest input's value. Earlier
    outputs of ckptavg caught among snapshots are left out (with a warning); every torch zip
    record read is checked against its CRC-32.
    """
    from ckptavg.engine.average import average as run

    with progress_bar(quiet or as_json or kwargs["dry_run"], "average") as bar:
        result = run(list(inputs), progress=bar, **kwargs)
    if reports():
        emit(result, as_json, quiet, _average_lines)


def _number(what: str, value, source: str) -> str:
    return f"{what} {value if value is not None else '?':>6} ({source or 'unknown'})"


def _average_lines(r):
    if r.dry_run:
        yield (f"plan: {r.method} average of {len(r.inputs)} input(s), {r.tensors} tensors, "
               f"read {human_bytes(r.bytes_in)}, write {human_bytes(r.bytes_out)} -> "
               f"{r.output or '(no output)'}")
        for i, path in enumerate(r.inputs):
            yield (f"  {r.weights[i]:.6f}  {_number('epoch', r.epochs[i], r.epoch_sources[i])}"
                   f"  {_number('step', r.steps[i], r.step_sources[i])}  {path}")
        yield (f"  {'profile ' + r.profile + ', ' if r.profile else ''}effective number of "
               f"snapshots (1 / sum of squared weights): {r.effective_n:.2f}")
        return
    if not r.inputs:
        yield f"nothing to fold into {r.into}: n stays {r.n}"
        return
    ranks = f" on {r.ranks} ranks" if r.ranks > 1 else ""
    yield (f"averaged {len(r.inputs)} checkpoint(s) ({r.method}, n={r.n}) -> {r.output}: "
           f"{human_bytes(r.bytes_out)} in {r.seconds:.1f} s{ranks}, peak RSS "
           f"{human_bytes(r.peak_rss_bytes)}")


@cli.command(cls=TorchWhenNeeded)
@click.argument("path")
@click.option("--keys", "n_keys", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many keys to list (0: all).")
@input_options
@output_options
def inspect(path, n_keys, key, strip_prefix, as_json, quiet):
    """Show a checkpoint's format, tensors, sizes per dtype and metadata."""
    from ckptavg.io.checkpoint import inspect as run

    emit(run(path, key=key, strip_prefix=strip_prefix), as_json, quiet,
         lambda info: _inspect_lines(info, n_keys))


def _inspect_lines(info, n_keys):
    yield (f"{info.path}: {info.format}, {info.tensors} tensors, {info.parameters:,} values, "
           f"{human_bytes(info.bytes)}")
    for dt, b in sorted(info.bytes_per_dtype.items()):
        yield f"  {dt:<10} {human_bytes(b)}"
    if info.location not in (None, "<top level>"):
        yield f"weights from entry: {info.location}"
    if info.removed_prefixes:
        yield f"prefixes removed: {', '.join(info.removed_prefixes)}"
    if info.other_tensor_dicts:
        yield (f"other tensor dicts: {', '.join(info.other_tensor_dicts)} "
               "(pick one with --key)")
    if info.other_entries:
        yield f"other entries (never averaged): {', '.join(info.other_entries)}"
    if info.tied:
        yield f"tied: {', '.join(f'{a} -> {b}' for a, b in info.tied.items())}"
    if info.metadata:
        yield "metadata:"
        for k, v in sorted(info.metadata.items()):
            yield f"  {k} = {v if len(v) <= 120 else v[:117] + '...'}"
    keys = info.keys if n_keys == 0 else info.keys[:n_keys]
    yield "keys:"
    for e in keys:
        yield f"  {e['key']:<50} {str(e['shape']):<20} {e['dtype']}"
    if len(keys) < len(info.keys):
        yield f"  ... {len(info.keys) - len(keys)} more (--keys 0 lists all)"


@cli.command("bn-fix")
@click.argument("checkpoint")
@click.option("-o", "--output", help="Where to write (default: the checkpoint, atomically in place).")
@run_options
@stats_option
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Use the training transforms for the pass (as the SWA paper).")
@click.option("--split", type=click.Choice(options.choices(options.Split)), default="train",
              show_default=True)
@click.option("--batches", type=click.IntRange(min=1), help="Use only this many batches.")
@click.option("--fraction", type=float, help="Use only this share of the batches (0-1].")
@click.option("--subset", type=click.IntRange(min=1), help="Use only the first N images "
              "(default: the images the run trained on, from data.train_images metadata).")
@seed_option
def bn_fix_cmd(checkpoint, as_json, quiet, **kwargs):
    """Recompute BatchNorm statistics of an averaged checkpoint with one data pass.

    The model is rebuilt from the checkpoint's model.* metadata unless --model is given.
    """
    from ckptavg.nn.bn import bn_fix

    with progress_bar(quiet or as_json, "bn-fix", unit="batch") as bar:
        result = bn_fix(checkpoint, progress=bar, **kwargs)
    if not reports():
        return
    emit(result, as_json, quiet, lambda r: [
        f"{checkpoint}: {r.message}" if r.bn_layers == 0 else
        f"recalibrated {r.bn_layers} BatchNorm layers on {r.samples} samples ({r.batches} "
        f"batches, {r.stats}, {r.device}) in {r.seconds:.1f} s -> {r.output}"])


@cli.command("eval")
@click.argument("checkpoints", nargs=-1)
@run_options
@split_option
@click.option("--subset", type=click.IntRange(min=1), help="Evaluate on the first N samples only.")
@click.option("--swag", "swag_path", help="A file written by `ckptavg swag`: score its Bayesian "
              "model average and the SWA mean (CHECKPOINTS, if any, are scored beside them).")
@click.option("--samples", type=click.IntRange(min=1), default=options.SWAG_SAMPLES, show_default=True,
              help="With --swag: weight samples averaged in prediction.")
@click.option("--scale", type=click.FloatRange(min=0), default=options.SWAG_SCALE, show_default=True,
              help="With --swag: covariance scale of the samples (0: the SWA mean).")
@click.option("--diag", is_flag=True, help="With --swag: SWAG-diagonal (no low-rank part).")
@stats_option
@click.option("--bn-batches", type=click.IntRange(min=1),
              help="With --swag: recalibrate BatchNorm of each sample on this many batches.")
@seed_option
@click.option("--plot", help="With --swag: write a reliability diagram (PNG).")
def eval_cmd(checkpoints, as_json, quiet, swag_path, samples, scale, diag, stats, bn_batches,
             seed, plot, **kwargs):
    """Accuracy and mean cross-entropy of a checkpoint on a data split.

    With --swag, SWAG's accuracy, NLL and expected calibration error (15 bins) beside the
    SWA mean's and those of CHECKPOINTS (e.g. the final SGD weights).
    """
    if swag_path is None:
        if len(checkpoints) != 1 or plot is not None:
            raise click.UsageError("give one CHECKPOINT (or --swag FILE and any checkpoints to "
                                   "compare; --plot goes with --swag)")
        from ckptavg.nn.evaluation import evaluate

        with progress_bar(quiet or as_json, "eval", unit="batch") as bar:
            result = evaluate(checkpoints[0], progress=bar, **kwargs)
        if not reports():
            return
        emit(result, as_json, quiet, lambda r: [
            f"{checkpoints[0]}: {r.data} {r.split}: accuracy {r.accuracy:.2f} %, loss "
            f"{r.loss:.4f}, {r.samples} samples"])
        return
    from ckptavg.selection.swag import evaluate_swag

    for name in ("key", "strip_prefix"):
        if kwargs.pop(name) is not None:
            raise click.UsageError(f"--{name.replace('_', '-')} does not go with --swag")
    with progress_bar(quiet or as_json, "swag", unit="pass") as bar:
        result = evaluate_swag(swag_path, list(checkpoints), samples=samples, scale=scale,
                               diag=diag, stats=stats, bn_batches=bn_batches, seed=seed,
                               plot=plot, progress=bar, **kwargs)
    emit(result, as_json, quiet, _swag_eval_lines)


def _swag_eval_lines(r):
    yield (f"{r.data} {r.split}, {r.rows[0].samples} samples; SWAG: {r.samples} draws, scale "
           f"{r.scale}, seed {r.seed}")
    yield f"  {'':<40} {'accuracy':>9} {'NLL':>8} {'ECE':>7}"
    for row in r.rows:
        yield f"  {row.name:<40} {row.accuracy:8.2f} % {row.nll:8.4f} {row.ece:7.4f}"
    if r.plot:
        yield f"reliability diagram -> {r.plot}"


@cli.command("swag")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output: .safetensors or a folder.")
@click.option("--rank", type=click.IntRange(min=2), default=options.SWAG_RANK, show_default=True,
              help="K: the last K snapshots are kept as deviations from the mean.")
@window_options
@input_options
@output_options
def swag_cmd(inputs, as_json, quiet, **kwargs):
    """Fit SWAG (mean, diagonal variance, rank-K deviations) from a run's snapshots.

    One streaming pass per tensor, in float64; memory stays a few tensors times K.
    Score it with `ckptavg eval --swag OUTPUT`.
    """
    from ckptavg.selection.swag import swag

    with progress_bar(quiet or as_json, "swag", unit="tensor") as bar:
        result = swag(list(inputs), progress=bar, **kwargs)
    emit(result, as_json, quiet, lambda r: [
        f"SWAG of {r.n} snapshots (rank {r.rank}: the last {len(r.deviations)}) -> {r.output}: "
        f"{human_bytes(r.bytes_out)} in {r.seconds:.1f} s, peak RSS {human_bytes(r.peak_rss_bytes)}"])


@cli.command("ensemble")
@click.argument("checkpoints", nargs=-1, required=True)
@run_options
@split_option
@click.option("--subset", type=click.IntRange(min=1), help="Evaluate on the first N samples only.")
def ensemble_cmd(checkpoints, as_json, quiet, **kwargs):
    """Accuracy and loss of the prediction ensemble (mean softmax) of CHECKPOINTS.

    This is what SWA approximates at the cost of one model. Globs are expanded.
    """
    from ckptavg.engine.select import expand
    from ckptavg.experiments.ensemble import ensemble

    with progress_bar(quiet or as_json, "ensemble", unit="model") as bar:
        result = ensemble(expand(list(checkpoints)), progress=bar, **kwargs)
    emit(result, as_json, quiet, lambda r: [
        *(f"  {m.accuracy:6.2f} %  {m.checkpoint}" for m in r.members),
        f"ensemble of {r.n}: accuracy {r.accuracy:.2f} %, loss {r.loss:.4f} ({r.samples} samples)"])


# What soup and search share: the held-out split, the BatchNorm pass before each score, and
# the one test evaluation of the final choice.
heldout_options = group(
    click.option("--holdout", type=click.IntRange(min=1), help="Score on the last N of the "
                 "training images (of the first --subset), as train --holdout held them out "
                 "(default: the checkpoints' data.holdout metadata)."),
    click.option("--subset", type=click.IntRange(min=1), help="The held-out images are the last "
                 "--holdout of the first N (default: data.train_images + --holdout)."),
    stats_option,
    click.option("--bn-batches", type=click.IntRange(min=1),
                 help="Recalibrate BatchNorm on this many batches (default: all)."),
    seed_option,
    click.option("--test", is_flag=True, help="Also score the final choice on the test split "
                 "(read only then, never during selection)."),
)


def _test_line(r):
    if r.test_accuracy is not None:
        yield f"test accuracy of the choice: {r.test_accuracy:.2f} %, loss {r.test_loss:.4f}"


@cli.command("soup")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Write the soup here (.safetensors, .pt, a folder).")
@click.option("--uniform", is_flag=True, help="Average every input (the uniform soup).")
@heldout_options
@run_options
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


@cli.command("search")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Write the best window's average here.")
@click.option("--plot", help="Write held-out accuracy against the start epoch (PNG).")
@click.option("--profiles", help="Score these averaging profiles instead of windows, comma "
              "separated (e.g. uniform,ema:halflife=5,power:sigma_rel=0.1,wsm:minus-sqrt; "
              "see average --profile), and write the best.")
@window_options
@heldout_options
@run_options
def search_cmd(inputs, as_json, quiet, profiles, **kwargs):
    """When should averaging start, or with which profile? Chosen on held-out images.

    Each window's average (from each start to the last checkpoint) is BatchNorm-recalibrated
    and scored on held-out training images; the windows share one running sum, so each reads
    one more checkpoint. With --profiles, each profile's weighted average of the selection is
    scored the same way instead.
    """
    if profiles is not None:
        from ckptavg.engine.profiles import split_specs
        from ckptavg.selection.profile_search import search_profiles

        if kwargs.pop("plot") is not None:
            raise click.UsageError("--plot draws the window search; it does not go with "
                                   "--profiles")
        with progress_bar(quiet or as_json, "search", unit="profile") as bar:
            result = search_profiles(list(inputs), split_specs(profiles), progress=bar, **kwargs)
        emit(result, as_json, quiet, _profile_lines)
        return
    from ckptavg.selection.search import search

    with progress_bar(quiet or as_json, "search", unit="window") as bar:
        result = search(list(inputs), progress=bar, **kwargs)
    emit(result, as_json, quiet, _search_lines)


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


@cli.command("models")
@output_options
def models_cmd(as_json, quiet):
    """List the registered model names (also: torchvision:NAME, timm:NAME, package.module:factory)."""
    from ckptavg.nn.models import describe, list_models

    names = list_models()
    if as_json:
        emit_json(names)
        return
    if quiet:
        return
    for n in names:
        click.echo(f"{n:<18} {describe(n)}")
    click.echo("also: torchvision:NAME, timm:NAME (with timm installed), package.module:factory")


@cli.command("train")
@model_options(required=True)
@data_options(required=True)
@click.option("--epochs", type=click.IntRange(min=1), required=True, help="Training budget in epochs.")
@click.option("--out", required=True, help="Run folder (new or empty, or with --resume): "
              "epoch-NNNN.safetensors, last.pt, metrics.jsonl.")
@click.option("--schedule", type=click.Choice(options.choices(options.Schedule)), default="swa",
              show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Initial rate (alpha1 with --cycle).")
@click.option("--swa-start", type=click.FloatRange(min=0, min_open=True),
              help="Epoch from which the SWA phase starts, or a fraction of --epochs below 1 "
              "(swa schedule; default 0.75).")
@click.option("--swa-lr", type=float, help="SWA rate (alpha2 with --cycle; default half of --lr).")
@click.option("--cycle", type=int, help="Cyclical SWA rate: cycles of C epochs from --swa-start.")
@click.option("--anneal-epochs", type=click.IntRange(min=1), help="Lightning's/SWALR's rule instead "
              "of the paper's decay: --lr until --swa-start, then annealed to --swa-lr over N epochs.")
@click.option("--anneal", type=click.Choice(options.choices(options.Anneal)), default="linear",
              show_default=True, help="Shape of the annealing (with --anneal-epochs).")
@click.option("--wd", type=float, default=5e-4, show_default=True, help="Weight decay.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=options.TRAIN_BATCH_SIZE,
              show_default=True)
@seed_option
@click.option("--amp", is_flag=True, help="Mixed precision (GPU only).")
@click.option("--subset", type=click.IntRange(min=1), help="Use only the first N training images.")
@click.option("--holdout", type=click.IntRange(min=0), default=0,
              help="Hold out the last N of the training images for validation.")
@click.option("--save", type=click.Choice(options.choices(options.SaveWhat)), default="epoch",
              show_default=True, help="Which weights-only checkpoints to write.")
@click.option("--eval-every", type=click.IntRange(min=0), default=1, show_default=True,
              help="Score the test set every N epochs and after the last one (0: never).")
@workers_option
@click.option("--threads", type=click.IntRange(min=1), help="torch threads for training "
              "(default: torch's). Same seed and same thread count give the same run; another "
              "thread count gives another (recorded as train.threads).")
@click.option("--swa-in-loop", is_flag=True, help="Also keep the running SWA average in memory "
              "(written to OUT/swa-inloop.safetensors).")
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in OUT from OUT/last.pt.")
@click.option("--stop-after", type=click.IntRange(min=1),
              help="Train at most N epochs in this call (resume later).")
@output_options
def train_cmd(device, download, resume, stop_after, as_json, quiet, **kwargs):
    """Train with the SWA paper's SGD or SWA schedule, saving a checkpoint per epoch.

    \b
    ckptavg train --model preresnet164 --data cifar10 --epochs 225 --lr 0.1 --wd 3e-4 \\
        --swa-start 126 --swa-lr 0.01 --out runs/a
    ckptavg average runs/a/epoch-*.safetensors --from-epoch 126 -o swa.safetensors
    """
    from ckptavg.train.loop import TrainConfig, train

    kwargs["model_kwargs"] = kwargs["model_kwargs"] or {}
    if kwargs["swa_start"] is not None and kwargs["swa_start"] >= 1:
        kwargs["swa_start"] = int(kwargs["swa_start"]) if kwargs["swa_start"].is_integer() \
            else kwargs["swa_start"]
    show = not (quiet or as_json)

    def on_epoch(row):
        if show:
            test = f", test acc {row['test_acc']:.2f} %" if "test_acc" in row else ""
            say(f"epoch {row['epoch']:>4}  lr {row['lr']:.5f}  train loss "
                f"{row['train_loss']:.4f}{test}  ({row['seconds']:.1f} s)")

    with progress_bar(not show, "train", unit="batch") as bar:
        result = train(TrainConfig(**kwargs), device=device, resume=resume, download=download,
                       stop_after=stop_after, on_batch=bar, on_epoch=on_epoch,
                       on_stage=bar.describe)
    emit(result, as_json, quiet, lambda r: [
        f"trained {r.epochs_run} epoch(s) -> {r.out} ({len(r.checkpoints)} checkpoints, saving "
        f"took {r.save_overhead * 100:.2f} % of epoch time)"])


@cli.command("demo")
@click.option("--out", help="Keep the run's files in this folder (default: a temporary one).")
@click.option("--epochs", type=click.IntRange(min=2), help="Override the demo's 32 epochs.")
@device_option
@output_options
def demo_cmd(out, epochs, device, as_json, quiet):
    """Train, average, fix BatchNorm and evaluate on a shipped Fashion-MNIST subset (offline).

    Prints the test accuracy of the run's last iterate (at the constant SWA rate), of the SWA
    average of its last epochs, and of an SGD baseline (the same budget with the SGD schedule).
    """
    from ckptavg.experiments.demo import run_demo

    show = not (quiet or as_json)

    def on_stage(msg):
        if show:
            say(f"[demo] {msg}")

    def on_epoch(row):
        if show:
            say(f"  epoch {row['epoch']:>3}  lr {row['lr']:.4f}  loss {row['train_loss']:.4f}"
                f"  test acc {row.get('test_acc', float('nan')):.2f} %  ({row['seconds']:.1f} s)")

    with progress_bar(not show, "demo", unit="batch") as bar:
        result = run_demo(out, device=device, epochs=epochs, on_stage=on_stage, on_batch=bar,
                          on_epoch=on_epoch, on_step=bar.describe)
    emit(result, as_json, quiet, lambda r: [
        f"last iterate (epoch {r.epochs}, SWA rate): test accuracy {r.last_iterate.accuracy:.2f} "
        f"%, loss {r.last_iterate.loss:.4f}",
        f"SWA (average of {r.averaged} epochs, BN recalibrated): test accuracy "
        f"{r.swa.accuracy:.2f} %, loss {r.swa.loss:.4f}",
        *([f"SGD baseline (SGD schedule, {r.epochs} epochs): test accuracy "
           f"{r.sgd.accuracy:.2f} %, loss {r.sgd.loss:.4f}"] if r.sgd else []),
        *([f"files kept in {r.out}"] if r.out else [])])


@cli.command("width")
@click.argument("a")
@click.argument("b")
@click.option("-o", "--output", "plot_path", default="width.png", show_default=True,
              help="The plot (PNG); a CSV of every number is written beside it.")
@model_options()
@data_options()
@click.option("--labels", callback=_two_names,
              help="Two comma-separated names for A and B (e.g. SGD,SWA).")
@click.option("--rays", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--points", type=click.IntRange(min=2), default=21, show_default=True)
@click.option("--max-distance", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True)
@click.option("--bn-fix/--no-bn-fix", default=True, show_default=True,
              help="Recalibrate BatchNorm at every point.")
@click.option("--train-subset", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Training images for the train loss and BatchNorm (0: all).")
@click.option("--test-subset", type=click.IntRange(min=1), help="Test images (default: all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=options.EVAL_BATCH_SIZE,
              show_default=True)
@seed_option
@device_option
@output_options
def width_cmd(a, b, labels, train_subset, plot_path, as_json, quiet, **kwargs):
    """Width of two optima along the same random rays (SWA paper, Figure 4)."""
    from ckptavg.experiments.width import width

    csv_path = os.path.splitext(plot_path)[0] + ".csv"
    points = kwargs["rays"] * kwargs["points"] * 2
    if not quiet and points > 100:
        say(f"ckptavg: note: width measures {points} points (rays x points x 2), each a "
            f"{'BatchNorm pass and ' if kwargs['bn_fix'] else ''}two evaluations; "
            "--rays and --points make it shorter")
    with progress_bar(quiet or as_json, "width", unit="point") as bar:
        result = width(a, b, labels=labels, train_subset=train_subset or None, csv_path=csv_path,
                       plot_path=plot_path, progress=bar, **kwargs)
    emit(result, as_json, quiet, lambda r: [
        *(f"{s.label}: test error {s.centre_test_error:.2f} % at the centre, median "
          f"{s.median_test_error_at_max:.2f} % at distance {r.max_distance:g}" for s in r.summary),
        f"wrote {r.plot} and {r.csv}"])


@cli.command("replicate")
@click.option("--preset", required=True, help="fashion-mnist, fashion-mnist-vgg, fashion-mnist-preresnet110, cifar10-vgg16, cifar10-preresnet164, "
              "cifar10-wrn28-10, cifar100-vgg16, cifar100-preresnet164, cifar100-wrn28-10.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many seeds, from --first-seed.")
@click.option("--first-seed", type=int, default=0, show_default=True)
@click.option("--seed-list", callback=lambda ctx, param, v: _int_list(v),
              help="Run these seeds instead, comma-separated (e.g. 1,2,3).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seeds run at once, each in its own process.")
@click.option("--out", required=True, help="Folder for runs, results.json, results.md, curves.png.")
@data_dir_option
@device_option
@click.option("--budget", type=click.IntRange(min=1), help="Override the preset's budget B (epochs).")
@click.option("--swa-start", type=click.IntRange(min=1), help="Override the preset's SWA start epoch.")
@click.option("--subset", type=click.IntRange(min=1), help="Override: use the first N training images.")
@click.option("--holdout", type=click.IntRange(min=0),
              help="Override: hold out the last N of them for validation.")
@click.option("--model", help="Override the preset's model.")
@output_options
def replicate_cmd(preset, seeds, first_seed, seed_list, jobs, out, data_dir, device, as_json,
                  quiet, **overrides):
    """Reproduce the paper's Table 1 protocol: SGD vs SWA at 1, 1.25 and 1.5 budgets."""
    from ckptavg.experiments.replicate import replicate, results_table

    def log(msg):
        if not (quiet or as_json):
            say(f"[replicate] {msg}")

    result = replicate(preset, out, seeds=seed_list or seeds, first_seed=first_seed,
                       data_dir=data_dir, device=device, jobs=jobs, log=log, overrides=overrides)
    if as_json:
        result.per_seed = []  # every number is in OUT/results.json
    emit(result, as_json, quiet, lambda r: [results_table(r)])


@cli.command("beyond")
@click.argument("out")
@data_dir_option
@device_option
@click.option("--samples", type=click.IntRange(min=1), default=options.SWAG_SAMPLES,
              show_default=True, help="SWAG weight samples per seed.")
@click.option("--bn-batches", type=click.IntRange(min=1),
              help="Recalibrate BatchNorm on this many batches for every candidate.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Seeds run at once, each in its own process.")
@output_options
def beyond_cmd(out, data_dir, device, samples, bn_batches, jobs, as_json, quiet):
    """Soups, SWA window search and SWAG on the runs of `ckptavg replicate --out OUT`.

    Writes OUT/beyond.json, OUT/beyond.md, and per seed a search plot and a reliability
    diagram. Selection sees only the held-out images; the test split scores each choice once.
    """
    from ckptavg.experiments.beyond import beyond, beyond_table

    def log(msg):
        if not (quiet or as_json):
            say(f"[beyond] {msg}")

    result = beyond(out, data_dir=data_dir, device=device, samples=samples,
                    bn_batches=bn_batches, jobs=jobs, log=log)
    if as_json:
        result.per_seed = []  # every number is in OUT/beyond.json
    emit(result, as_json, quiet, lambda r: [beyond_table(r)])


def fail(e: click.ClickException, as_json: bool) -> None:
    """Leave with one line on stderr (and, with --json, an error object on stdout, so a
    pipeline that parses stdout gets JSON either way) and the error's exit code: 1 for a
    problem in the files or data, 2 for a usage error (an option's value, a missing option,
    an unknown one), Click's or the library's."""
    message = e.format_message()
    if isinstance(e, click.UsageError) and e.ctx is not None:
        message = message.rstrip(".") + f" (see '{e.ctx.command_path} --help')"
    click.echo(f"ckptavg: error: {message}", err=True)
    if as_json:
        emit_json({"error": message, "exit_code": e.exit_code})
    sys.exit(e.exit_code)


def _on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so writers remove their temporary files.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exit codes: 0 done, 1 a user or machine problem (one line),
    2 a usage error (Click's), 130 interrupted (Ctrl-C), 128+N killed by signal N."""
    try:
        _main(argv)
    except SystemExit as e:
        if not _ranked():
            raise
        # Under torchrun, once the work is done (outputs committed, process group destroyed),
        # leave without the interpreter's teardown: torch's gloo threads were seen to abort a
        # rank there now and then (docs/scaling.md, "Known issue"), which made torchrun report
        # a failure for a finished run.
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _ranked() -> bool:
    """Whether this process is a rank of a torchrun launch that used torch.distributed
    (checked only once torch.distributed is loaded: `--help` never imports torch)."""
    if "torch.distributed" not in sys.modules:
        return False
    from ckptavg.parallel import world_size

    return world_size() > 1


def _main(argv: list[str] | None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # standalone_mode=False returns the exit code (of --help, --version) instead of exiting
        rc = cli.main(args=args, prog_name="ckptavg", standalone_mode=False)
    except click.ClickException as e:
        fail(e, JSON_FLAG in args)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("ckptavg: interrupted; nothing was written", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
