"""Commands on checkpoint files: average, inspect, swag, models."""

from __future__ import annotations

import click

from ckptavg import options
from ckptavg.cli.app import TorchWhenNeeded, cli
from ckptavg.cli.options import (
    deprecated_alias,
    from_fields,
    output_option,
    output_options,
    report_options,
    resolve_alias,
)
from ckptavg.cli.output import emit, emit_json, human_bytes, progress_bar, reports
from ckptavg.options import WINDOW, Reading, Selection


@cli.command(cls=TorchWhenNeeded)
@click.argument("inputs", nargs=-1, required=True)
@output_option("Output (required, unless --into or --dry-run): .safetensors, "
               ".pt/.pth/.ckpt/.tar (torch.load reads it with weights_only=True; laid out as "
               "the newest input, a bare state dict for a bare one), .bin (a bare state "
               "dict), or a folder (sharded).")
@click.option("--into", type=click.Path(), help="Fold the inputs into this existing average "
              "(running mean from its average.n); written back in place unless -o is given.")
@from_fields(Selection, "selection")
@click.option("--weights", callback=lambda ctx, p, v: _floats(v),
              help="Comma-separated weights, one per selected input (normalised).")
@click.option("--ema", type=float, help="Exponential moving average with this decay, as torch's "
              "AveragedModel EMA: the oldest input seeds it, each later one is folded in with "
              "weight 1-decay (so with few inputs the oldest can weigh most).")
@click.option("--profile", help="Weights from where each input was saved (its step, else its "
              "epoch), whatever the spacing: ema:halflife=H, ema:decay=D,per=P, "
              "power:sigma_rel=S (EDM2's power EMA), power:gamma=G, wsm:linear, "
              "wsm:minus-sqrt, wsm:cosine (WSM merge weights), time (by the time each "
              "input stands for), uniform. See docs/profiles.md.")
@from_fields(Reading, "reading")
@click.option("--accumulate", type=click.Choice(options.choices(options.Accumulate)),
              default=options.ACCUMULATE, show_default=True, help="Precision of the running sum.")
@click.option("--dtype", type=click.Choice(options.choices(options.OutDtype)),
              help="Output dtype of floating tensors (default: as in the inputs).")
@click.option("--shard-size", callback=lambda ctx, p, v: _size(v),
              help="Write a sharded folder with shards of at most this size (e.g. 2GB).")
@click.option("--allow-nonfinite", is_flag=True, help="Average even if an input holds NaN/Inf.")
@click.option("--hash", "hash_inputs", is_flag=True, help="Record each input's sha256 in the metadata.")
@click.option("--arith-threads", "threads", type=click.IntRange(min=1),
              default=options.AVERAGE_THREADS, help="Threads for the arithmetic (default: the "
              "cores idle at the start, less the one that reads ahead).")
@deprecated_alias("--threads", "--arith-threads", "threads", type=click.IntRange(min=1))
@click.option("--dcp", is_flag=True, help="Write a torch.distributed.checkpoint folder (new or "
              "empty), as FSDP loads it; staged as shards beside it, then saved from them.")
@click.option("--resume", is_flag=True, help="Finish a folder or --dcp output that a failed or killed "
              "run left unfinished: its finished shards (kept in .OUTPUT.ckptavg-partial) are "
              "checked and only the missing ones are reduced.")
@click.option("--sweep", help="window=W[,stride=S]: one average per position of a window "
              "sliding over the selected inputs (W inputs, or tokens with an SI suffix: "
              "window=125B), from one read of every input; -o is a folder, or a name "
              "template with {index}, {first}, {last}.")
@click.option("--dry-run", is_flag=True, help="Read every input as the real run does (checksums, NaN/Inf, duplicates) and print the plan; write nothing.")
@output_options
def average(inputs, as_json, quiet, **kwargs):
    """Average checkpoints into one, streaming one tensor at a time.

    INPUTS are files or glob patterns: safetensors files, sharded safetensors folders, DCP
    folders, or torch.save files (.pt .pth .bin .ckpt .tar), ordered by epoch and step
    (metadata, the checkpoint's own entries, or the numbers in their names). Floating
    tensors are averaged in float64; integer tensors keep the newest input's value. Earlier
    outputs of ckptavg caught among snapshots are left out (with a warning); every torch zip
    record read is checked against its CRC-32.

    \b
    Examples:
      ckptavg average 'runs/epoch-*.pt' --from-epoch 161 -o swa.pt
      ckptavg average runs/*.ckpt --last 5 -o swa.ckpt            # Lightning, loadable as one
      ckptavg average runs/checkpoint-* --profile ema:halflife=2000 -o ema/
      ckptavg average runs/epoch-0301.pt --into swa.pt             # fold in a new epoch
      ckptavg average runs/*.pt --dry-run                          # read all, write nothing
      ckptavg average 'runs/*.pt' --sweep window=4 -o sweep/        # every 4 in a row, one read
    """
    from ckptavg.engine.average import average as run

    resolve_alias(kwargs, "--threads", "--arith-threads", "threads")
    with progress_bar(quiet or as_json, "average") as bar:
        result = run(list(inputs), progress=bar, **kwargs)
    if reports():
        emit(result, as_json, quiet, _average_lines)


def _floats(value):
    from ckptavg.cli.options import _numbers

    return _numbers(float)(None, None, value)


def _size(value):
    from ckptavg.cli.options import parse_size

    return parse_size(value)


@cli.command(cls=TorchWhenNeeded)
@click.argument("path")
@click.option("--keys", "n_keys", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many keys to list (0: all).")
@from_fields(Reading, "reading")
@report_options
def inspect(path, n_keys, reading, as_json, quiet):
    """Show a checkpoint's format, tensors, sizes per dtype and metadata."""
    from ckptavg.io.checkpoint import inspect as run

    emit(run(path, key=reading.key, strip_prefix=reading.strip_prefix), as_json, quiet,
         lambda info: _inspect_lines(info, n_keys))


@cli.command(cls=TorchWhenNeeded)
@click.argument("output")
@click.argument("inputs", nargs=-1)
@report_options
def verify(output, inputs, as_json, quiet):
    """Re-derive an average from the recipe in its metadata; compare bit for bit.

    OUTPUT is a file or folder written by `ckptavg average`. Its inputs are found where its
    metadata records them (relative to OUTPUT), or among INPUTS (files or globs, matched by
    file name) when they moved. Every input is read once, its content hash checked against
    the recorded one, and the average recomputed and compared with OUTPUT byte for byte;
    nothing is written. BatchNorm statistics recomputed by bn-fix are not compared.

    \b
    Exit codes: 0 verified; 1 OUTPUT differs from what its inputs give;
    3 an input is missing or is not the file that was averaged;
    4 OUTPUT records no recipe (another tool, an older ckptavg, or --into).

    \b
    Examples:
      ckptavg verify swa.safetensors
      ckptavg verify release/model.safetensors 'runs/epoch-*.pt'   # inputs moved
    """
    from ckptavg.engine.verify import verify as run

    with progress_bar(quiet or as_json, "verify") as bar:
        result = run(output, list(inputs), progress=bar)
    emit(result, as_json, quiet, _verify_lines)
    if result.exit_code:
        raise SystemExit(result.exit_code)


def _verify_lines(r):
    if r.status == "verified":
        skipped = (f" (BatchNorm statistics recomputed by bn-fix not compared: "
                   f"{len(r.skipped)} tensors)" if r.skipped else "")
        yield (f"verified: {r.output} is bit for bit the average of its {len(r.inputs)} "
               f"recorded input(s): {r.tensors} tensors compared{skipped}")
        return
    yield f"{r.status}: {r.output}"
    for p in r.problems:
        yield f"  {p}"


@cli.command("swag")
@click.argument("inputs", nargs=-1, required=True)
@output_option("Output: .safetensors or a folder.", required=True)
@click.option("--rank", type=click.IntRange(min=2), default=options.SWAG_RANK, show_default=True,
              help="K: the last K snapshots are kept as deviations from the mean.")
@from_fields(Selection, "selection", only=WINDOW)
@from_fields(Reading, "reading")
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


@cli.command("models")
@report_options
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


def human_count(n: int) -> str:
    """125000000000 -> 125B: a token count as the options take it (exact, else 3 digits)."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            q, r = divmod(n, scale)
            return f"{q}{suffix}" if r == 0 else f"{n / scale:.3g}{suffix}"
    return str(n)


def _number(what: str, value, source: str) -> str:
    return f"{what} {value if value is not None else '?':>6} ({source or 'unknown'})"


_ORDER = {"tokens": "tokens seen (profiles weight by them too)", "step": "step", "epoch": "epoch", "given": "the order given (--given-order)",
          "name": "the numbers in the names (some input has no epoch or step)"}


def _sweep_lines(r):
    what = "would write" if r.dry_run else "wrote"
    yield (f"sweep {r.sweep}: {len(r.windows)} window(s) over {len(r.inputs)} input(s), each "
           f"read once ({human_bytes(r.bytes_in)}); {what} {human_bytes(r.bytes_out)}"
           + ("" if r.dry_run else f" in {r.seconds:.1f} s, peak RSS "
              f"{human_bytes(r.peak_rss_bytes)}"))
    if r.dry_run:
        yield f"  in training order by {_ORDER.get(r.order, r.order)}"
    for w in r.windows:
        names = [p.rsplit("/", 1)[-1] for p in w.inputs]
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        yield f"  {len(w.inputs)} input(s) {span} -> {w.output or '(no output)'}"


def _average_lines(r):
    if r.sweep:
        yield from _sweep_lines(r)
        return
    if r.dry_run:
        yield (f"plan: {r.method} average of {len(r.inputs)} input(s), {r.tensors} tensors, "
               f"read {human_bytes(r.bytes_in)}, write {human_bytes(r.bytes_out)} -> "
               f"{r.output or '(no output)'}")
        yield f"  in training order by {_ORDER.get(r.order, r.order)}:"
        for i, path in enumerate(r.inputs):
            tokens = (f"  tokens {human_count(r.tokens[i])} ({r.token_sources[i]})"
                      if i < len(r.tokens) and r.tokens[i] is not None else "")
            yield (f"  {r.weights[i]:.6f}  {_number('epoch', r.epochs[i], r.epoch_sources[i])}"
                   f"  {_number('step', r.steps[i], r.step_sources[i])}{tokens}  {path}")
        yield (f"  {'profile ' + r.profile + ', ' if r.profile else ''}effective number of "
               f"snapshots (1 / sum of squared weights): {r.effective_n:.2f}")
        return
    if not r.inputs:
        yield f"nothing to fold into {r.into}: n stays {r.n}"
        return
    ranks = f" on {r.ranks} ranks" if r.ranks > 1 else ""
    done = (f"folded {len(r.inputs) - 1} new checkpoint(s) into {r.into}" if r.into
            else f"averaged {len(r.inputs)} checkpoint(s)")
    yield (f"{done} ({r.method}, n={r.n}) -> {r.output}: "
           f"{human_bytes(r.bytes_out)} in {r.seconds:.1f} s{ranks}, peak RSS "
           f"{human_bytes(r.peak_rss_bytes)}")


def _inspect_lines(info, n_keys):
    yield (f"{info.path}: {info.format}, {info.tensors} tensors, {info.parameters:,} values, "
           f"{human_bytes(info.bytes)}")
    for dt, b in sorted(info.bytes_per_dtype.items()):
        yield f"  {dt:<10} {human_bytes(b)}"
    if info.quantization:
        yield (f"quantized: {info.quantization.scheme} (from {info.quantization.seen}); "
               + ("average dequantizes each input, averages in float64 and requantizes"
                  if info.quantization.averaged else "average refuses it"))
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
        yield f"  {e.key:<50} {str(e.shape):<20} {e.dtype}"
    if len(keys) < len(info.keys):
        yield f"  ... {len(info.keys) - len(keys)} more (--keys 0 lists all)"
