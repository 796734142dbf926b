"""The options shared by the API and the CLI, declared once.

Each group of options is a frozen dataclass (where the weights are in a file, which of a
run's checkpoints take part, the model, the data, the loader, the held-out images). Library
functions take these objects; the CLI turns each field into a Click option with one
decorator (`ckptavg.cli.options.from_fields`), with the field's default, its one flag name
and its help. A field's old flag spelling is kept as a deprecated alias for one release.

This module does not import torch (nor click), so `--help` is built from it quickly.

Example:
    >>> from ckptavg.options import DataOptions, Selection
    >>> Selection(from_epoch=126).from_epoch
    126
    >>> DataOptions.of("cifar10")
    DataOptions(data='cifar10', data_dir=None, download=False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

Split = Literal["train", "test"]
Stats = Literal["update_bn", "exact"]
Schedule = Literal["sgd", "swa"]
Anneal = Literal["linear", "cos"]
SaveWhat = Literal["epoch", "cycle-end", "none"]
Accumulate = Literal["float64", "float32"]
OutDtype = Literal["float32", "bfloat16", "float16", "float64"]
Method = Literal["uniform", "weighted", "ema", "profile"]

DEVICE = "auto"  # auto, cpu, cuda, cuda:N
EVAL_BATCH_SIZE = 256  # evaluate, ensemble, width, bn-fix
TRAIN_BATCH_SIZE = 128
WORKERS = 0
SEED = 0
ACCUMULATE: Accumulate = "float64"
STATS: Stats = "update_bn"
SWAG_RANK = 20  # K, as the SWAG authors
SWAG_SAMPLES = 30
SWAG_SCALE = 0.5
AVERAGE_THREADS = None  # threads for average's arithmetic; None: the idle cores less one
DEPRECATED_IN = "0.2"  # old flag spellings warn from this release and go in the next


def choices(literal) -> list[str]:
    """The values of a Literal type, in order: `choices(Split) == ["train", "test"]`."""
    return list(get_args(literal))


def check_choice(name: str, value, literal) -> None:
    """Raise an OptionError when `value` is not one of `literal`'s values."""
    allowed = choices(literal)
    if value not in allowed:
        from ckptavg.errors import OptionError

        raise OptionError(name, f"use one of {', '.join(allowed)}", repr(value))


# SI suffixes of counts (tokens): B is billion, as G; the one table of them
SI = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12, "p": 10**15}


def count(value, name: str = "tokens") -> int:
    """A whole count, such as a number of tokens, from an int or a string with an SI suffix:
    "125B" (also "125G"), "1.5T", "500M", "20k", "3000". Not a byte size: B is billion.

    Example:
        >>> count("125B"), count("1.5T"), count("20k"), count(3000)
        (125000000000, 1500000000000, 20000, 3000)
    """
    import re
    from fractions import Fraction

    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMbBgGtTpP]?)\s*", str(value))
        exact = Fraction(m.group(1)) * SI[m.group(2).lower()] if m else None
        if exact is None or exact.denominator != 1:
            from ckptavg.errors import OptionError

            raise OptionError(name, "give a whole count, with an SI suffix if you like: "
                              "125B, 1.5T, 500M, 20k or 3000", repr(value))
        n = int(exact)
    if n < 0:
        from ckptavg.errors import OptionError

        raise OptionError(name, "must be 0 or more", n)
    return n


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line. `kind`: str, int, float, bool (a flag),
    choice (of `choices`), json (an object), ints or floats (comma-separated), size (2GB),
    count (a whole number with an SI suffix: 125B tokens)."""

    names: tuple[str, ...]
    help: str
    kind: str = "str"
    min: float | None = None
    min_open: bool = False
    choices: Any = None
    deprecated: tuple[str, ...] = ()  # old spellings: accepted with a warning
    show_default: bool = True
    toggle: str | None = None  # bool with an off switch: "--bn-fix/--no-bn-fix"


def opt(default, *names: str, help: str, kind: str = "str", min: float | None = None,
        min_open: bool = False, choices=None, deprecated: tuple[str, ...] = (),
        show_default: bool = True, toggle: str | None = None, factory=None):
    """A dataclass field that knows its command-line flag."""
    meta = {"flag": Flag(names, help, kind, min, min_open, choices, deprecated, show_default,
                         toggle)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def same(cls, name: str, default, *, help: str | None = None, factory=None):
    """A dataclass field that is options class `cls`'s field `name` on the command line: its
    flag, type, range, choices and old spellings are declared there once; this field has its
    own default and, where its context needs other words, its own help (TrainConfig's
    `--seed` seeds a run, HeldOutOptions' the BatchNorm passes)."""
    f = flag_of(cls, name)
    meta = {"flag": f if help is None else replace(f, help=help)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(cls, name: str) -> Flag:
    """The Flag of field `name` of an options class."""
    return next(f.metadata["flag"] for f in fields(cls) if f.name == name)


class _Of:
    """`Cls.of(value)`: an options object from itself, None (the defaults) or its first
    field's value (`DataOptions.of("cifar10")`)."""

    @classmethod
    def of(cls, value):
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls(**value)
        return cls(value)


@dataclass(frozen=True)
class Reading(_Of):
    """Where the weights are in each checkpoint."""

    key: str | None = opt(None, "--key", help="Entry of a torch checkpoint that holds the "
                          "weights (e.g. state_dict_ema).")
    strip_prefix: str | None = opt(None, "--strip-prefix", help="Remove this prefix from keys "
                                   "(module./_orig_mod. go by themselves).")


@dataclass(frozen=True)
class Selection(_Of):
    """Which of one run's checkpoints take part, applied in this order: epoch window, step
    window, token window, cycle ends, every K-th (from the first), best N by a stored
    metric, last N. Epochs and steps come from metadata, the checkpoint's own entries or the
    file name; tokens from metadata or the checkpoint's own records (never the name)."""

    from_epoch: int | None = opt(None, "--from-epoch", kind="int", help="Keep inputs from this "
                                 "epoch on (from metadata, the checkpoint's own epoch entry, or "
                                 "the name).")
    to_epoch: int | None = opt(None, "--to-epoch", kind="int", help="Keep inputs up to this epoch.")
    from_step: int | None = opt(None, "--from-step", kind="int", help="Keep inputs from this "
                                "training step on.")
    to_step: int | None = opt(None, "--to-step", kind="int", help="Keep inputs up to this "
                              "training step.")
    from_tokens: int | str | None = opt(None, "--from-tokens", kind="count", help="Keep inputs "
                                        "saved at this many training tokens or later (SI "
                                        "suffixes: 100B, 1.5T; from metadata train.tokens, a "
                                        "trainer_state.json's num_input_tokens_seen or the "
                                        "checkpoint's own token count).")
    to_tokens: int | str | None = opt(None, "--to-tokens", kind="count", help="Keep inputs "
                                      "saved at this many training tokens or earlier.")
    cycle_ends: bool = opt(False, "--cycle-ends", kind="bool", help="Keep inputs whose "
                           "metadata marks a cycle end.")
    every: int | None = opt(None, "--every", kind="int", min=1, help="Keep every K-th input, "
                            "starting with the first.")
    best: int | None = opt(None, "--best", kind="int", min=1, help="Keep the N inputs with the "
                           "best --metric.")
    metric: str | None = opt(None, "--metric", help="Stored score to rank by: a metadata key "
                             "(train.val_acc) or a number in the checkpoint (timm's metric).")
    lowest: bool = opt(False, "--lowest", kind="bool", help="With --best: lower is better (a loss).")
    last: int | None = opt(None, "--last", kind="int", min=1, help="Keep only the last N "
                           "inputs (after the other filters; at most as many as there are).")
    given_order: bool = opt(False, "--given-order", kind="bool", help="Take the inputs in the "
                            "order given (each glob's matches by name), not by epoch or step: "
                            "what --last, --every, --ema and --weights need when some input "
                            "has no epoch or step.")


# The window options of commands that take no step window and no metric (search, swag).
WINDOW = ("from_epoch", "to_epoch", "last", "every", "cycle_ends", "given_order")


@dataclass(frozen=True)
class ModelOptions(_Of):
    """The network the weights belong to (default: the checkpoint's model.* metadata)."""

    model: str | None = opt(None, "--model", help="Model name (see `ckptavg models`), "
                            "torchvision:NAME, timm:NAME or package.module:factory. The factory "
                            "is called with --model-kwargs, plus num_classes and in_channels "
                            "(timm: in_chans) where the data set tells them and the factory's "
                            "signature names them; --model-kwargs win.")
    model_kwargs: Mapping[str, Any] | None = opt(None, "--model-kwargs", kind="json",
                                                 help="JSON keyword arguments for the model "
                                                 "factory.")


# where a named data set is looked for when no --data-dir is given (nn.data.default_data_dir)
DATA_DIR_DEFAULT = ("$CKPTAVG_DATA if set, else $XDG_CACHE_HOME/ckptavg/data if XDG_CACHE_HOME "
                    "is an absolute path, else ~/.cache/ckptavg/data")


@dataclass(frozen=True)
class DataOptions(_Of):
    """The data set (default: the checkpoint's data.name metadata)."""

    data: str | None = opt(None, "--data", help="cifar10, cifar100, fashion-mnist, mnist, svhn, "
                           "imagefolder or package.module:function (looked up in the working "
                           "folder; called with split='train'|'test' and augment=True|False when "
                           "it takes those parameters; returns a Dataset or DataLoader of (input, "
                           "label) batches).")
    data_dir: str | None = opt(None, "--data-dir", help="Data root (torchvision's root); "
                               "default: the folder the run recorded (data.dir) when it is there, "
                               f"else {DATA_DIR_DEFAULT}.")
    download: bool = opt(False, "--download", kind="bool", help="Download the data set if missing.")


@dataclass(frozen=True)
class LoaderOptions(_Of):
    """How batches are made and where the network runs."""

    batch_size: int = opt(EVAL_BATCH_SIZE, "--batch-size", kind="int", min=1, help="Images per batch.")
    workers: int = opt(WORKERS, "--workers", kind="int", min=0, help="DataLoader worker processes.")
    input_key: str | None = opt(None, "--input-key", help="Key of the input in dict batches.")
    device: str = opt(DEVICE, "--device", help="auto, cpu or cuda[:N].")


@dataclass(frozen=True)
class HeldOutOptions(_Of):
    """The held-out images every candidate is scored on, and how BatchNorm is recalibrated
    before it is: the last `holdout` of the first `train_images` training images, as
    `train --train-images S --holdout N` split them (default: from the checkpoints'
    data.holdout and data.train_images metadata)."""

    holdout: int | None = opt(None, "--holdout", kind="int", min=0, help="Held-out images: the "
                              "last N of the training images (default: the run's data.holdout "
                              "metadata).")
    train_images: int | None = opt(None, "--train-images", kind="int", min=1,
                                   deprecated=("--subset",), help="The training images of the "
                                   "run: the held-out images are the last --holdout of the "
                                   "first N (default: data.train_images + data.holdout).")
    seed: int = opt(SEED, "--seed", kind="int", help="Seed of the BatchNorm passes.")
    stats: Stats = opt(STATS, "--stats", kind="choice", choices=Stats, help="BatchNorm "
                       "statistics: update_bn, torch's semantics; exact, population statistics.")
    bn_batches: int | None = opt(None, "--bn-batches", kind="int", min=1, help="Recalibrate "
                                 "BatchNorm on this many batches for every candidate.")
