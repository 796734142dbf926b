"""Click options, declared once: from the library's option classes (`from_fields`) and, for
the few that belong to no class, as module-level decorators that every command shares.

A command decorated with `from_fields(DataOptions, into="data")` receives one `data`
argument, a `DataOptions` built from its flags; defaults and help come from the class.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import MISSING, fields

import click

from ckptavg import options
from ckptavg.options import Flag

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


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


def _count(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return options.count(value)
    except Exception:
        raise click.BadParameter(f"{value!r}: give a whole count, with an SI suffix if you "
                                 "like: 125B, 1.5T, 500M, 20k or 3000") from None


def _json_object(ctx, param, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(f"{value!r} is not JSON, e.g. '{{\"width\": 64}}'") from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object")
    return out


def _numbers(kind):
    def parse(ctx, param, value: str | None):
        if value is None:
            return None
        try:
            return [kind(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r}: give {'integers' if kind is int else 'numbers'} "
                                     "separated by commas, e.g. 1,2,3") from None
    return parse


def _type_and_callback(flag: Flag):
    if flag.kind == "int":
        return (click.IntRange(min=int(flag.min)) if flag.min is not None else int), None
    if flag.kind == "float":
        return (click.FloatRange(min=flag.min, min_open=flag.min_open)
                if flag.min is not None else float), None
    if flag.kind == "choice":
        return click.Choice(options.choices(flag.choices)), None
    if flag.kind == "json":
        return None, _json_object
    if flag.kind == "ints":
        return None, _numbers(int)
    if flag.kind == "floats":
        return None, _numbers(float)
    if flag.kind == "size":
        return None, lambda ctx, param, v: parse_size(v)
    if flag.kind == "count":
        return None, _count
    return None, None


def option(name: str, flag: Flag, default=None, *, required: bool = False,
           help_suffix: str = "") -> list:
    """The click options of one field: its flag, and one hidden option per deprecated
    spelling (`_old_<name>_<i>`, resolved by `from_fields`)."""
    typ, callback = _type_and_callback(flag)
    kw = dict(help=flag.help + help_suffix, required=required)
    if flag.kind == "bool":
        decls = [flag.toggle] if flag.toggle else list(flag.names)
        made = click.option(*decls, name, is_flag=True, default=bool(default),
                            show_default=bool(flag.toggle), **kw)
    else:
        made = click.option(*flag.names, name, type=typ, callback=callback, default=default,
                            show_default=flag.show_default and default is not None, **kw)
    out = [made]
    for i, old in enumerate(flag.deprecated):
        if flag.kind == "bool":
            out.append(click.option(old, f"_old_{name}_{i}", is_flag=True, default=None,
                                    hidden=True))
        else:
            out.append(click.option(old, f"_old_{name}_{i}", type=typ, callback=callback,
                                    default=None, hidden=True))
    return out


def from_fields(cls, into: str | None = None, *, only=None, exclude=(), required=(),
                defaults: dict | None = None, help_suffix: dict | None = None):
    """Click options for the fields of the options class `cls` (those in `only`, less
    `exclude`), with the class's defaults unless `defaults` overrides one. The command
    gets one `into` keyword holding a `cls` (or, with into=None, each field by name).
    A deprecated spelling warns on stderr and fills its field; both spellings at once is a
    usage error."""
    chosen = [f for f in fields(cls) if f.metadata.get("flag") and
              (only is None or f.name in only) and f.name not in exclude]
    if only is not None:
        chosen.sort(key=lambda f: list(only).index(f.name))
    defaults = defaults or {}
    suffixes = help_suffix or {}
    decorators = []
    for f in chosen:
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        decorators += option(f.name, f.metadata["flag"], default, required=f.name in required,
                             help_suffix=suffixes.get(f.name, ""))

    def apply(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {}
            for f in chosen:
                values[f.name] = kwargs.pop(f.name)
                flag = f.metadata["flag"]
                for i, old in enumerate(flag.deprecated):
                    given = kwargs.pop(f"_old_{f.name}_{i}")
                    if given is None:
                        continue
                    _deprecated(old, flag.names)
                    values[f.name] = given
            if into is None:
                kwargs.update(values)
            else:
                kwargs[into] = cls(**values)
            return fn(*args, **kwargs)

        for d in reversed(decorators):
            wrapper = d(wrapper)
        return wrapper
    return apply


def _typed(flag: str) -> bool:
    ctx = click.get_current_context(silent=True)
    typed = ctx.meta.get("ckptavg.argv", []) if ctx is not None else []
    return any(a == flag or a.startswith(flag + "=") for a in typed)


def deprecated_alias(old: str, new: str, name: str, **kw):
    """A hidden `old` spelling of the option `new` (parameter `name`), for options declared
    here rather than on a class; `resolve_alias` merges it with a warning."""
    return click.option(old, f"_old_{name}", hidden=True, default=None, **kw)


def resolve_alias(kwargs: dict, old: str, new: str, name: str) -> None:
    """Fold a deprecated spelling's value (hidden parameter `_old_<name>`) into
    `kwargs[name]`, with a warning; both spellings typed at once is a usage error."""
    given = kwargs.pop(f"_old_{name}", None)
    if given is None:
        return
    _deprecated(old, ("-o", new) if new == "--output" else (new,))
    kwargs[name] = given


def _deprecated(old: str, new: tuple[str, ...]) -> None:
    """An old spelling was given: a usage error when one of the new spellings `new` was
    typed too, else a warning naming the long one."""
    if any(_typed(n) for n in new):
        raise click.UsageError(f"{old} and {new[-1]} are one option; give {new[-1]} only")
    click.echo(f"ckptavg: warning: {old} is deprecated (since {options.DEPRECATED_IN}) and goes "
               f"in the next release; use {new[-1]}", err=True)


def group(*opts):
    """One decorator applying several click options in the order given."""
    def apply(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return apply


# ------------------------------------------------- options that belong to no class, declared once

JSON_FLAG = "--json"
json_option = click.option(JSON_FLAG, "as_json", is_flag=True, help="Print the result as JSON on stdout.")
output_options = group(json_option,
                       click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary."))
# the commands that only report (inspect, models): nothing to show progress of
report_options = group(json_option, click.option(
    "-q", "--quiet", is_flag=True, help="Print nothing but errors (the exit code tells)."))
seed_option = click.option("--seed", type=int, default=options.SEED, show_default=True,
                           help="Seed of everything random in the command.")
device_option = click.option("--device", default=options.DEVICE, show_default=True,
                             help="auto, cpu or cuda[:N].")
stats_option = click.option("--stats", type=click.Choice(options.choices(options.Stats)),
                            default=options.STATS, show_default=True,
                            help="BatchNorm statistics: update_bn, torch's semantics; exact, "
                            "population statistics.")
split_option = click.option(
    "--split", type=click.Choice(options.choices(options.Split)), default=None,
    help="The data split to score (default: test). A --data package.module:function is "
    "called with split='train'|'test' and augment=True|False when it takes them; one that "
    "takes no split cannot be asked for test images, so say which images it returns.")
eval_images_option = group(
    click.option("--eval-images", type=click.IntRange(min=1),
                 help="Score only the first N images of the split."),
    deprecated_alias("--subset", "--eval-images", "eval_images", type=click.IntRange(min=1)))
jobs_option = click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Seeds run at once, each in its own process.")
bn_batches_option = click.option("--bn-batches", type=click.IntRange(min=1),
                                 help="Recalibrate BatchNorm on this many batches.")
samples_option = click.option("--samples", type=click.IntRange(min=1), default=options.SWAG_SAMPLES,
                              show_default=True, help="SWAG weight samples averaged in prediction.")


def _overwrite(ctx: click.Context, param, value: bool) -> None:
    """--overwrite: the command's library call runs within `io.writer.replacing()`."""
    if value:
        from ckptavg.io.writer import replacing

        ctx.with_resource(replacing())


def output_option(help: str, *, required: bool = False, default=None, name: str = "output",
                  old: str | None = None):
    """`-o/--output`: where a command writes (one spelling for every command); `old` a
    deprecated spelling the command had."""
    made = [click.option("-o", "--output", name, required=False if old else required,
                         default=default, show_default=default is not None, help=help),
            click.option("--overwrite", is_flag=True, expose_value=False,
                         callback=_overwrite, help="Replace an existing output file that is "
                         "not an output of ckptavg (a training checkpoint, a file of yours); "
                         "an earlier output of ckptavg is replaced without it.")]
    if old:
        made.append(deprecated_alias(old, "--output", name))
    return group(*made)
