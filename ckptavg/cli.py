"""The `ckptavg` command: one Click group, each subcommand one call of the Python API.

This is the only module that prints, draws progress bars or exits. It imports torch only
inside commands, so `ckptavg --help` stays fast.
"""

from __future__ import annotations

import json
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
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


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


def _on_sigterm(signum, frame):
    # Turn SIGTERM into an exception so writers remove their temporary files.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli.main(args=argv, prog_name="ckptavg")
