"""Commands that train or run the paper's experiments: train, demo, width, replicate,
beyond, ablation."""

from __future__ import annotations

import click

from ckptavg.cli.app import cli
from ckptavg.cli.options import (
    deprecated_alias,
    device_option,
    from_fields,
    jobs_option,
    output_option,
    output_options,
    resolve_alias,
    samples_option,
    seed_option,
)
from ckptavg.cli.output import emit, progress_bar, say
from ckptavg.options import DataOptions, LoaderOptions, ModelOptions
from ckptavg.train.config import TrainConfig

data_dir_option = from_fields(DataOptions, only=("data_dir",))


@cli.command("train")
@from_fields(TrainConfig, required=("model", "data", "epochs"))
@click.option("--download", is_flag=True, help="Download the data set if missing.")
@device_option
@click.option("--resume", is_flag=True, help="Continue the run in OUT from OUT/last.pt.")
@click.option("--stop-after", type=click.IntRange(min=1),
              help="Train at most N epochs in this call (resume later).")
@output_options
def train_cmd(device, download, resume, stop_after, as_json, quiet, **kwargs):
    """Train with the SWA paper's SGD or SWA schedule, saving a checkpoint per epoch.

    \b
    ckptavg train --model preresnet164 --data cifar10 --epochs 225 --lr 0.1 --wd 3e-4 \\
        --swa-start 126 --swa-lr 0.01 -o runs/a
    ckptavg average runs/a/epoch-*.safetensors --from-epoch 126 -o swa.safetensors
    """
    from ckptavg.train.loop import train

    if kwargs["out"] is None:
        raise click.MissingParameter(param_type="option", param_hint="'-o' / '--output'")
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
@output_option("Keep the run's files in this folder (default: a temporary one).", old="--out")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the demo's 32 epochs "
              "(2 or more: SGD, then SWA).")
@device_option
@output_options
def demo_cmd(output, epochs, device, as_json, quiet, **old):
    """Train, average, fix BatchNorm and evaluate on a shipped Fashion-MNIST subset (offline).

    Prints the test accuracy of the run's last iterate (at the constant SWA rate), of the SWA
    average of its last epochs, and of an SGD baseline (the same budget with the SGD schedule).
    """
    from ckptavg.experiments.demo import run_demo

    old["output"] = output
    resolve_alias(old, "--out", "--output", "output")
    show = not (quiet or as_json)

    def on_stage(msg):
        if show:
            say(f"[demo] {msg}")

    def on_epoch(row):
        if show:
            say(f"  epoch {row['epoch']:>3}  lr {row['lr']:.4f}  loss {row['train_loss']:.4f}"
                f"  test acc {row.get('test_acc', float('nan')):.2f} %  ({row['seconds']:.1f} s)")

    with progress_bar(not show, "demo", unit="batch") as bar:
        result = run_demo(old["output"], device=device, epochs=epochs, on_stage=on_stage,
                          on_batch=bar, on_epoch=on_epoch, on_step=bar.describe)
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
@output_option("The plot (PNG); a CSV of every number is written beside it.",
               default="width.png", name="plot_path")
@from_fields(ModelOptions, "model")
@from_fields(DataOptions, "data")
@from_fields(LoaderOptions, "loader", only=("batch_size", "device"))
@click.option("--labels", callback=lambda ctx, p, v: _two_names(v),
              help="Two comma-separated names for A and B (e.g. SGD,SWA).")
@click.option("--rays", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--points", type=click.IntRange(min=2), default=21, show_default=True)
@click.option("--max-distance", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True)
@click.option("--bn-fix/--no-bn-fix", default=True, show_default=True,
              help="Recalibrate BatchNorm at every point.")
@click.option("--train-images", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Training images for the train loss and BatchNorm (the default takes all "
              "when there are fewer; give the training set's size for all).")
@deprecated_alias("--train-subset", "--train-images", "train_images", type=click.IntRange(min=1))
@click.option("--eval-images", type=click.IntRange(min=1), help="Test images (default: all).")
@deprecated_alias("--test-subset", "--eval-images", "eval_images", type=click.IntRange(min=1))
@seed_option
@output_options
def width_cmd(a, b, labels, plot_path, as_json, quiet, **kwargs):
    """Width of two optima along the same random rays (SWA paper, Figure 4)."""
    from ckptavg.experiments.width import width

    resolve_alias(kwargs, "--train-subset", "--train-images", "train_images")
    resolve_alias(kwargs, "--test-subset", "--eval-images", "eval_images")
    points = kwargs["rays"] * kwargs["points"] * 2
    note = None if quiet or points <= 100 else (
        f"ckptavg: note: width measures {points} points (rays x points x 2), each a "
        f"{'BatchNorm pass and ' if kwargs['bn_fix'] else ''}two evaluations; "
        "--rays and --points make it shorter")
    with progress_bar(quiet or as_json, "width", unit="point") as bar:
        def progress(done: int, total: int) -> None:
            nonlocal note
            if note:  # once the measurement starts: a mistake before it is one line alone
                say(note)
                note = None
            bar(done, total)

        result = width(a, b, labels=labels, plot_path=plot_path, progress=progress, **kwargs)
    emit(result, as_json, quiet, lambda r: [
        *(f"{s.label}: test error {s.centre_test_error:.2f} % at the centre, median "
          f"{s.median_test_error_at_max:.2f} % at distance {r.max_distance:g}" for s in r.summary),
        f"wrote {r.plot} and {r.csv}"])


def _two_names(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    names = tuple(x.strip() for x in value.split(","))
    if len(names) != 2 or not all(names):
        raise click.BadParameter(f"{value!r}: give two names, e.g. SGD,SWA")
    return names


def _int_list(value: str | None) -> list[int] | None:
    from ckptavg.cli.options import _numbers

    return _numbers(int)(None, None, value)


@cli.command("replicate")
@click.option("--preset", required=True, help="fashion-mnist, fashion-mnist-vgg, "
              "fashion-mnist-preresnet110, cifar10-vgg16, cifar10-preresnet164, "
              "cifar10-wrn28-10, cifar100-vgg16, cifar100-preresnet164, cifar100-wrn28-10.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many seeds, from --first-seed.")
@click.option("--first-seed", type=int, default=0, show_default=True)
@click.option("--seed-list", callback=lambda ctx, param, v: _int_list(v),
              help="Run these seeds instead, comma-separated (e.g. 1,2,3).")
@jobs_option
@output_option("Folder for runs, results.json, results.md, curves.png.", old="--out")
@data_dir_option
@device_option
@click.option("--budget", type=click.IntRange(min=1), help="Override the preset's budget B (epochs).")
@click.option("--swa-start", type=click.FloatRange(min=0, min_open=True),
              help="Override the preset's SWA start: an epoch, or a fraction of the budget "
              "below 1.")
@click.option("--train-images", type=click.IntRange(min=1),
              help="Override: use the first N training images.")
@deprecated_alias("--subset", "--train-images", "train_images", type=click.IntRange(min=1))
@click.option("--holdout", type=click.IntRange(min=0),
              help="Override: hold out the last N of them for validation.")
@click.option("--model", help="Override the preset's model.")
@output_options
def replicate_cmd(preset, seeds, first_seed, seed_list, jobs, output, data_dir, device, as_json,
                  quiet, **overrides):
    """Reproduce the paper's Table 1 protocol: SGD vs SWA at 1, 1.25 and 1.5 budgets."""
    from ckptavg.experiments.replicate import replicate, results_table

    where = {"output": output, **{k: overrides.pop(k) for k in list(overrides)
                                  if k.startswith("_old_output")}}
    resolve_alias(where, "--out", "--output", "output")
    resolve_alias(overrides, "--subset", "--train-images", "train_images")
    if where["output"] is None:
        raise click.MissingParameter(param_type="option", param_hint="'-o' / '--output'")

    def log(msg):
        if not (quiet or as_json):
            say(f"[replicate] {msg}")

    result = replicate(preset, where["output"], seeds=seed_list or seeds, first_seed=first_seed,
                       data_dir=data_dir, device=device, jobs=jobs, log=log, overrides=overrides)
    emit(result, as_json, quiet, lambda r: [results_table(r)])


@cli.command("beyond")
@click.argument("out")
@data_dir_option
@device_option
@samples_option
@click.option("--bn-batches", type=click.IntRange(min=1),
              help="Recalibrate BatchNorm on this many batches for every candidate.")
@jobs_option
@output_options
def beyond_cmd(out, data_dir, device, samples, bn_batches, jobs, as_json, quiet):
    """Soups, SWA window search and SWAG on the runs of `ckptavg replicate -o OUT`.

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


@cli.command("ablation")
@output_option("Folder for the variants' runs and ablation.json.", required=True)
@click.option("--preset", default="fashion-mnist-vgg", show_default=True,
              help="The protocol whose factors are changed one at a time.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of every run.")
@data_dir_option
@output_options
def ablation_cmd(output, preset, seed, data_dir, as_json, quiet):
    """What SWA's gain over SGD depends on: one factor of a preset changed at a time.

    Per variant, the protocol's SGD and SWA runs, scored on the held-out images only (the
    test split is never read); a variant that only changes the SWA rate reuses the
    baseline's SGD run. Writes OUTPUT/ablation.json.
    """
    from ckptavg.experiments.ablation import ablate

    result = ablate(output, preset=preset, seed=seed, data_dir=data_dir)
    emit(result, as_json, quiet, lambda r: [
        f"{name:<32} SGD {v['sgd']:.2f}  SWA 1/1.25/1.5 B {v['swa_1']:.2f} / "
        f"{v['swa_1.25']:.2f} / {v['swa_1.5']:.2f}  (1.5 B - SGD {v['swa_1.5_minus_sgd']:+.2f})"
        for name, v in r.variants.items()])
