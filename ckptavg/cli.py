"""The `ckptavg` command: one Click group, each subcommand one call of the Python API.

This is the only module that prints, draws progress bars or exits. It imports torch only
inside commands, so `ckptavg --help` stays fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from contextlib import contextmanager

import click

from ckptavg import __version__
from ckptavg.errors import CkptavgError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class UserError(click.ClickException):
    """A CkptavgError on its way out: one line on stderr, exit 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"ckptavg: error: {self.message}", err=True)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptavgError as e:
            raise UserError(str(e)) from None
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


@contextmanager
def progress_bar(quiet: bool, desc: str, unit: str = "B"):
    """A progress callback `(done, total)` drawing tqdm on stderr when it is a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    scale = unit == "B"
    bar = tqdm(total=None, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
               disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if done < bar.n:  # a new pass (the next epoch): start the bar again
            bar.reset(total=total)
        elif bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def say(message: str) -> None:
    """A line on stderr that does not break an active progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptavg")
def cli() -> None:
    """Stochastic Weight Averaging, offline: average checkpoints, fix BatchNorm, evaluate.

    \b
    ckptavg average runs/a/*.safetensors --from-epoch 126 -o swa.safetensors
    ckptavg bn-fix swa.safetensors --data cifar10
    ckptavg eval swa.safetensors --data cifar10

    Exit codes: 0 success, 1 a problem with inputs or data (one line on stderr),
    2 a usage error.
    """


def _weights(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas, e.g. 1,2,3") from None


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output: .safetensors, .pt/.pth/.bin/.ckpt, or a folder (sharded).")
@click.option("--into", type=click.Path(), help="Fold the inputs into this existing average "
              "(running mean from its average.n); written back in place unless -o is given.")
@click.option("--from-epoch", type=int, help="Keep inputs from this epoch on (train.epoch or name).")
@click.option("--to-epoch", type=int, help="Keep inputs up to this epoch.")
@click.option("--last", type=int, help="Keep only the last N inputs (after the other filters).")
@click.option("--every", type=int, help="Keep every K-th input, starting with the first.")
@click.option("--cycle-ends", is_flag=True, help="Keep inputs whose metadata marks a cycle end.")
@click.option("--weights", help="Comma-separated weights, one per selected input (normalised).")
@click.option("--ema", type=float, help="Exponential weights with this decay; newest heaviest.")
@click.option("--key", help="Entry of a torch checkpoint that holds the weights (e.g. state_dict_ema).")
@click.option("--strip-prefix", help="Remove this prefix from keys (module./_orig_mod. go by themselves).")
@click.option("--accumulate", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True, help="Precision of the running sum.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "float64"]),
              help="Output dtype of floating tensors (default: as in the inputs).")
@click.option("--shard-size", help="Write a sharded folder with shards of at most this size (e.g. 2GB).")
@click.option("--allow-nonfinite", is_flag=True, help="Average even if an input holds NaN/Inf.")
@click.option("--hash", "hash_inputs", is_flag=True, help="Record each input's sha256 in the metadata.")
@click.option("--dry-run", is_flag=True, help="Check inputs and print the plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
def average(inputs, output, into, from_epoch, to_epoch, last, every, cycle_ends, weights, ema,
            key, strip_prefix, accumulate, dtype, shard_size, allow_nonfinite, hash_inputs,
            dry_run, as_json, quiet):
    """Average checkpoints into one, streaming one tensor at a time.

    INPUTS are files or glob patterns: safetensors files, sharded safetensors folders, or
    torch.save files (.pt .pth .bin .ckpt), ordered by train.epoch metadata or the numbers
    in their names. Floating tensors are averaged in float64; integer tensors keep the
    newest input's value.
    """
    from ckptavg.averaging import average as run

    size = parse_size(shard_size)
    with progress_bar(quiet or as_json or dry_run, "average") as bar:
        result = run(
            list(inputs), output, weights=_weights(weights), ema=ema, into=into,
            from_epoch=from_epoch, to_epoch=to_epoch, last=last, every=every,
            cycle_ends=cycle_ends, key=key, strip_prefix=strip_prefix, accumulate=accumulate,
            dtype=dtype, shard_size=size, allow_nonfinite=allow_nonfinite,
            hash_inputs=hash_inputs, dry_run=dry_run, progress=bar,
        )
    if as_json:
        emit_json(result.to_dict())
        return
    if dry_run:
        click.echo(f"plan: {result.method} average of {len(result.inputs)} input(s), "
                   f"{result.tensors} tensors, read {human_bytes(result.bytes_in)}, "
                   f"write {human_bytes(result.bytes_out)} -> {result.output or '(no output)'}")
        for path, w, ep in zip(result.inputs, result.weights[-len(result.inputs):], result.epochs):
            click.echo(f"  {w:.6f}  epoch {ep if ep is not None else '?':>5}  {path}")
        return
    if not quiet:
        click.echo(f"averaged {len(result.inputs)} checkpoint(s) ({result.method}, n={result.n}) "
                   f"-> {result.output}: {human_bytes(result.bytes_out)} in {result.seconds:.1f} s, "
                   f"peak RSS {human_bytes(result.peak_rss_bytes)}")


@cli.command()
@click.argument("path")
@click.option("--keys", "n_keys", type=int, default=20, show_default=True,
              help="How many keys to list (0: all).")
@click.option("--key", help="Entry of a torch checkpoint that holds the weights.")
@click.option("--strip-prefix", help="Remove this prefix from keys.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect(path, n_keys, key, strip_prefix, as_json):
    """Show a checkpoint's format, tensors, sizes per dtype and metadata."""
    from ckptavg.checkpoint import inspect as run

    info = run(path, key=key, strip_prefix=strip_prefix)
    if as_json:
        emit_json(info)
        return
    click.echo(f"{info['path']}: {info['format']}, {info['tensors']} tensors, "
               f"{info['parameters']:,} values, {human_bytes(info['bytes'])}")
    for dt, b in sorted(info["bytes_per_dtype"].items()):
        click.echo(f"  {dt:<10} {human_bytes(b)}")
    if info["tied"]:
        click.echo(f"tied: {', '.join(f'{a} -> {b}' for a, b in info['tied'].items())}")
    if info["metadata"]:
        click.echo("metadata:")
        for k, v in sorted(info["metadata"].items()):
            click.echo(f"  {k} = {v if len(v) <= 120 else v[:117] + '...'}")
    keys = info["keys"] if n_keys == 0 else info["keys"][:n_keys]
    click.echo("keys:")
    for e in keys:
        click.echo(f"  {e['key']:<50} {str(e['shape']):<20} {e['dtype']}")
    if len(keys) < len(info["keys"]):
        click.echo(f"  ... {len(info['keys']) - len(keys)} more (--keys 0 lists all)")


def _json_kwargs(value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(f"{value!r} is not JSON, e.g. '{{\"width\": 64}}'") from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object")
    return out


def data_options(fn):
    """Options shared by the commands that run a model over data."""
    opts = [
        click.option("--data", "data", help="cifar10, cifar100, fashion-mnist, mnist, svhn, "
                     "imagefolder or package.module:function (default: data.name metadata)."),
        click.option("--data-dir", help="Data root (torchvision's root); default $CKPTAVG_DATA "
                     "or ~/.cache/ckptavg/data."),
        click.option("--download", is_flag=True, help="Download the data set if missing."),
        click.option("--model", help="Model name, torchvision:NAME or package.module:factory "
                     "(default: model.arch metadata)."),
        click.option("--model-kwargs", help="JSON keyword arguments for the model factory."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                     help="DataLoader worker processes."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
        click.option("--input-key", help="Key of the input in dict batches."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@cli.command("bn-fix")
@click.argument("checkpoint")
@click.option("-o", "--output", help="Where to write (default: the checkpoint, atomically in place).")
@data_options
@click.option("--stats", type=click.Choice(["update_bn", "exact"]), default="update_bn",
              show_default=True, help="update_bn: torch's semantics; exact: population statistics.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Use the training transforms for the pass (as the SWA paper).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--batches", type=int, help="Use only this many batches.")
@click.option("--fraction", type=float, help="Use only this share of the data (0-1].")
@click.option("--subset", type=int, help="Use only the first N images (as `train --subset`).")
@click.option("--seed", type=int, default=0, show_default=True)
def bn_fix_cmd(checkpoint, output, data, data_dir, download, model, model_kwargs, batch_size,
               workers, device, input_key, as_json, quiet, stats, augment, split, batches,
               fraction, subset, seed):
    """Recompute BatchNorm statistics of an averaged checkpoint with one data pass.

    The model is rebuilt from the checkpoint's model.* metadata unless --model is given.
    """
    from ckptavg.bn import bn_fix

    with progress_bar(quiet or as_json, "bn-fix", unit="batch") as bar:
        result = bn_fix(checkpoint, output, data=data, data_dir=data_dir, download=download,
                        model=model, model_kwargs=_json_kwargs(model_kwargs), split=split,
                        augment=augment, batches=batches, fraction=fraction,
                        batch_size=batch_size, workers=workers, device=device, seed=seed,
                        stats=stats, input_key=input_key, subset=subset, progress=bar)
    if as_json:
        emit_json(result)
    elif not quiet:
        if result["bn_layers"] == 0:
            click.echo(f"{checkpoint}: {result['message']}")
        else:
            click.echo(f"recalibrated {result['bn_layers']} BatchNorm layers on "
                       f"{result['samples']} samples ({result['batches']} batches, {stats}, "
                       f"{result['device']}) in {result['seconds']:.1f} s -> {result['output']}")


@cli.command("eval")
@click.argument("checkpoint")
@data_options
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--subset", type=int, help="Evaluate on the first N samples only.")
def eval_cmd(checkpoint, data, data_dir, download, model, model_kwargs, batch_size, workers,
             device, input_key, as_json, quiet, split, subset):
    """Accuracy and mean cross-entropy of a checkpoint on a data split."""
    from ckptavg.evaluation import evaluate

    with progress_bar(quiet or as_json, "eval", unit="batch") as bar:
        result = evaluate(checkpoint, data=data, split=split, data_dir=data_dir,
                          download=download, model=model, model_kwargs=_json_kwargs(model_kwargs),
                          batch_size=batch_size, workers=workers, device=device,
                          input_key=input_key, subset=subset, progress=bar)
    if result["bn_stale"]:
        click.echo(f"ckptavg: warning: {checkpoint} has bn.stale=true (averaged, BatchNorm not "
                   "recalibrated): run `ckptavg bn-fix` first", err=True)
    if as_json:
        emit_json(result)
    elif not quiet:
        click.echo(f"{checkpoint}: {result['data']} {split}: accuracy {result['accuracy']:.2f} %, "
                   f"loss {result['loss']:.4f}, {result['samples']} samples")


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the names as a JSON list.")
def models_cmd(as_json):
    """List the registered model names (also: torchvision:NAME, package.module:factory)."""
    from ckptavg.models import describe, list_models

    names = list_models()
    if as_json:
        emit_json(names)
        return
    for n in names:
        click.echo(f"{n:<18} {describe(n)}")
    click.echo("also: torchvision:NAME (torchvision's builders), package.module:factory")


@cli.command("train")
@click.option("--model", required=True, help="Model name (see `ckptavg models`), torchvision:NAME "
              "or package.module:factory.")
@click.option("--model-kwargs", help="JSON keyword arguments for the model factory.")
@click.option("--data", required=True, help="Data set (cifar10, fashion-mnist, ...).")
@click.option("--data-dir", help="Data root; default $CKPTAVG_DATA or ~/.cache/ckptavg/data.")
@click.option("--download", is_flag=True, help="Download the data set if missing.")
@click.option("--epochs", type=int, required=True, help="Training budget in epochs.")
@click.option("--out", required=True, help="Run folder: epoch-NNNN.safetensors, last.pt, metrics.jsonl.")
@click.option("--schedule", type=click.Choice(["sgd", "swa"]), default="swa", show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Initial rate (alpha1 with --cycle).")
@click.option("--swa-start", type=int, help="Epoch from which the SWA phase starts (swa schedule).")
@click.option("--swa-lr", type=float, help="SWA rate (alpha2 with --cycle).")
@click.option("--cycle", type=int, help="Cyclical SWA rate: cycles of C epochs from --swa-start.")
@click.option("--wd", type=float, default=5e-4, show_default=True, help="Weight decay.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--amp", is_flag=True, help="Mixed precision (GPU only).")
@click.option("--subset", type=int, help="Use only the first N training images.")
@click.option("--holdout", type=int, default=0, help="Hold out the last N training images for validation.")
@click.option("--save", type=click.Choice(["epoch", "cycle-end", "none"]), default="epoch",
              show_default=True, help="Which weights-only checkpoints to write.")
@click.option("--eval-every", type=int, default=1, show_default=True,
              help="Test every N epochs (0: only never; the last epoch is always tested when N>0).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--stop-after", type=int, help="Train at most N epochs in this call (resume later).")
@click.option("--swa-in-loop", is_flag=True, help="Also keep the running SWA average in memory "
              "(written to OUT/swa-inloop.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no per-epoch lines.")
def train_cmd(model, model_kwargs, data, data_dir, download, epochs, out, schedule, lr, swa_start,
              swa_lr, cycle, wd, momentum, batch_size, seed, device, amp, subset, holdout, save,
              eval_every, workers, resume, stop_after, swa_in_loop, as_json, quiet):
    """Train with the SWA paper's SGD or SWA schedule, saving a checkpoint per epoch.

    \b
    ckptavg train --model preresnet164 --data cifar10 --epochs 225 --lr 0.1 --wd 3e-4 \\
        --swa-start 126 --swa-lr 0.01 --out runs/a
    ckptavg average runs/a/epoch-*.safetensors --from-epoch 126 -o swa.safetensors
    """
    from ckptavg.train.loop import TrainConfig, train

    cfg = TrainConfig(model=model, data=data, epochs=epochs, out=out, schedule=schedule, lr=lr,
                      swa_start=swa_start, swa_lr=swa_lr, wd=wd, momentum=momentum,
                      batch_size=batch_size, seed=seed, cycle=cycle, save=save, subset=subset,
                      holdout=holdout, eval_every=eval_every,
                      model_kwargs=_json_kwargs(model_kwargs) or {}, data_dir=data_dir,
                      workers=workers, amp=amp, swa_in_loop=swa_in_loop)
    show = not (quiet or as_json)

    def on_epoch(row):
        if show:
            test = f", test acc {row['test_acc']:.2f} %" if "test_acc" in row else ""
            say(f"epoch {row['epoch']:>4}  lr {row['lr']:.5f}  train loss "
                f"{row['train_loss']:.4f}{test}  ({row['seconds']:.1f} s)")

    with progress_bar(not show, "train", unit="batch") as bar:
        summary = train(cfg, device=device, resume=resume, download=download,
                        stop_after=stop_after, on_batch=bar, on_epoch=on_epoch)
    if as_json:
        emit_json(summary)
    elif not quiet:
        click.echo(f"trained {summary['epochs_run']} epoch(s) -> {out} "
                   f"({len(summary['checkpoints'])} checkpoints, saving took "
                   f"{summary['save_overhead'] * 100:.2f} % of epoch time)")


@cli.command("demo")
@click.option("--out", help="Keep the run's files in this folder (default: a temporary one).")
@click.option("--epochs", type=int, help="Override the demo's 32 epochs.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True)
def demo_cmd(out, epochs, device, as_json, quiet):
    """Train, average, fix BatchNorm and evaluate on a shipped Fashion-MNIST subset (offline).

    Prints the test accuracy of the final SGD weights and of their SWA average.
    """
    from ckptavg.demo import run_demo

    show = not (quiet or as_json)

    def on_stage(msg):
        if show:
            say(f"[demo] {msg}")

    def on_epoch(row):
        if show:
            say(f"  epoch {row['epoch']:>3}  lr {row['lr']:.4f}  loss {row['train_loss']:.4f}"
                f"  test acc {row.get('test_acc', float('nan')):.2f} %  ({row['seconds']:.1f} s)")

    with progress_bar(not show, "epoch", unit="batch") as bar:
        result = run_demo(out, device=device, epochs=epochs, on_stage=on_stage, on_batch=bar,
                          on_epoch=on_epoch)
    if as_json:
        emit_json(result)
        return
    if not quiet:
        click.echo(f"SGD (final weights, {result['sgd']['checkpoint']}): test accuracy "
                   f"{result['sgd']['accuracy']:.2f} %, loss {result['sgd']['loss']:.4f}")
        click.echo(f"SWA (average of {result['averaged']} epochs, BN recalibrated): test accuracy "
                   f"{result['swa']['accuracy']:.2f} %, loss {result['swa']['loss']:.4f}")
        if out:
            click.echo(f"files kept in {out}")


@cli.command("ensemble")
@click.argument("checkpoints", nargs=-1, required=True)
@data_options
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--subset", type=int, help="Evaluate on the first N samples only.")
def ensemble_cmd(checkpoints, data, data_dir, download, model, model_kwargs, batch_size, workers,
                 device, input_key, as_json, quiet, split, subset):
    """Accuracy and loss of the prediction ensemble (mean softmax) of CHECKPOINTS.

    This is what SWA approximates at the cost of one model. Globs are expanded.
    """
    from ckptavg.experiments.ensemble import ensemble
    from ckptavg.select import expand

    with progress_bar(quiet or as_json, "ensemble", unit="model") as bar:
        result = ensemble(expand(list(checkpoints)), data=data, split=split, data_dir=data_dir,
                          download=download, model=model, model_kwargs=_json_kwargs(model_kwargs),
                          batch_size=batch_size, workers=workers, device=device, subset=subset,
                          progress=bar)
    if as_json:
        emit_json(result)
    elif not quiet:
        for m in result["members"]:
            click.echo(f"  {m['accuracy']:6.2f} %  {m['checkpoint']}")
        click.echo(f"ensemble of {result['n']}: accuracy {result['accuracy']:.2f} %, "
                   f"loss {result['loss']:.4f} ({result['samples']} samples)")


@cli.command("width")
@click.argument("a")
@click.argument("b")
@click.option("-o", "--output", "plot", default="width.png", show_default=True,
              help="The plot (PNG); a CSV of every number is written beside it.")
@click.option("--data", help="Data set (default: data.name metadata).")
@click.option("--data-dir", help="Data root.")
@click.option("--download", is_flag=True)
@click.option("--model", help="Model name (default: model.arch metadata).")
@click.option("--model-kwargs", help="JSON keyword arguments for the model factory.")
@click.option("--labels", help="Two comma-separated names for A and B (e.g. SGD,SWA).")
@click.option("--rays", type=int, default=10, show_default=True)
@click.option("--points", type=int, default=21, show_default=True)
@click.option("--max-distance", type=float, default=10.0, show_default=True)
@click.option("--bn-fix/--no-bn-fix", default=True, show_default=True,
              help="Recalibrate BatchNorm at every point.")
@click.option("--train-subset", type=int, default=5000, show_default=True,
              help="Training images for the train loss and BatchNorm (0: all).")
@click.option("--test-subset", type=int, help="Test images (default: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def width_cmd(a, b, plot, data, data_dir, download, model, model_kwargs, labels, rays, points, max_distance, bn_fix,
              train_subset, test_subset, seed, device, as_json, quiet):
    """Width of two optima along the same random rays (SWA paper, Figure 4)."""
    from ckptavg.experiments.width import width

    names = tuple(labels.split(",")) if labels else None
    if names is not None and len(names) != 2:
        raise click.BadParameter("give two names, e.g. SGD,SWA", param_hint="--labels")
    csv_path = os.path.splitext(plot)[0] + ".csv"
    with progress_bar(quiet or as_json, "width", unit="point") as bar:
        result = width(a, b, data=data, data_dir=data_dir, download=download, model=model,
                       model_kwargs=_json_kwargs(model_kwargs), labels=names,
                       rays=rays, points=points, max_distance=max_distance, bn_fix=bn_fix,
                       train_subset=train_subset or None, test_subset=test_subset, seed=seed,
                       device=device, csv_path=csv_path, plot_path=plot, progress=bar)
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "rows"})
    elif not quiet:
        for label in result["labels"]:
            far = [r for r in result["rows"] if r["solution"] == label
                   and r["distance"] == max_distance]
            near = next(r for r in result["rows"] if r["solution"] == label and r["distance"] == 0)
            click.echo(f"{label}: test error {near['test_error']:.2f} % at the centre, median "
                       f"{sorted(r['test_error'] for r in far)[len(far) // 2]:.2f} % at distance "
                       f"{max_distance:g}")
        click.echo(f"wrote {plot} and {csv_path}")


@cli.command("replicate")
@click.option("--preset", required=True, help="fashion-mnist, cifar10-vgg16, cifar10-preresnet164, "
              "cifar10-wrn28-10, cifar100-... (see --list).")
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option("--first-seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, help="Folder for runs, results.json, results.md, curves.png.")
@click.option("--data-dir", help="Data root.")
@click.option("--device", default="auto", show_default=True)
@click.option("--budget", type=int, help="Override the preset's budget B (epochs).")
@click.option("--swa-start", type=int, help="Override the preset's SWA start epoch.")
@click.option("--subset", type=int, help="Override: use the first N training images.")
@click.option("--holdout", type=int, help="Override: hold out the last N of them for validation.")
@click.option("--model", help="Override the preset's model.")
@click.option("--json", "as_json", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def replicate_cmd(preset, seeds, first_seed, out, data_dir, device, budget, swa_start, subset,
                  holdout, model, as_json, quiet):
    """Reproduce the paper's Table 1 protocol: SGD vs SWA at 1, 1.25 and 1.5 budgets."""
    from ckptavg.experiments.replicate import replicate, results_table

    def log(msg):
        if not (quiet or as_json):
            say(f"[replicate] {msg}")

    result = replicate(preset, out, seeds=seeds, first_seed=first_seed, data_dir=data_dir,
                       device=device, log=log,
                       overrides={"budget": budget, "swa_start": swa_start, "subset": subset,
                                  "holdout": holdout, "model": model})
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "per_seed"})
    elif not quiet:
        click.echo(results_table(result))


def _on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so writers remove their temporary files.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exit codes: 0 done, 1 a user or machine problem (one line),
    2 a usage error (Click's), 130 interrupted (Ctrl-C), 128+N killed by signal N."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # standalone_mode=False returns the exit code (of --help, --version) instead of exiting
        rc = cli.main(args=argv, prog_name="ckptavg", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("ckptavg: interrupted; nothing was written", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
