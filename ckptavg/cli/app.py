"""The `ckptavg` group: how a command runs (torch imported when needed, signals held
during that import), how errors leave (one line, an exit code), and the entry point.

This package is the only place that prints, draws progress bars or exits.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from ckptavg.cli.options import JSON_FLAG
from ckptavg.cli.output import emit_json
from ckptavg.errors import USER_CODE, CkptavgError, OptionError
from ckptavg.version import __version__


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
    import (lazy.import_torch). An OptionError from the library names the option as
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
    from ckptavg.lazy import import_torch

    import_torch()


class Interrupted(BaseException):
    """Ctrl-C inside a command, carried past Click's own handling to `_main`."""


class Group(click.Group):
    command_class = Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptavgError as e:
            raise UserError(e) from None
        except KeyboardInterrupt:  # past Click, which would print a blank line first
            raise Interrupted from None
        except EOFError as e:  # Click would report it as "Aborted!": it is a bug, show it
            raise RuntimeError("unexpected end of input") from e


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
    --json, stdout also holds {"error": ..., "exit_code": ...}. An exception raised in your
    own code (data function, model factory, forward pass) exits 1 with a line naming it,
    then its traceback. Warnings go to stderr (and into --json's "warnings") unless -q.
    """


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
    except (KeyboardInterrupt, Interrupted, click.exceptions.Abort):
        click.echo("ckptavg: interrupted; no output was written (an average into a folder "
                   "keeps its finished shards: the same command with --resume finishes it)",
                   err=True)
        sys.exit(130)
    except Exception as e:  # a bug, ours or in the user's code: its traceback, and a line
        crashed(e, JSON_FLAG in args)
    sys.exit(rc if isinstance(rc, int) else 0)


def crashed(e: Exception, as_json: bool) -> None:
    """Leave after an exception that is not a user mistake: one line that says whose code
    raised it (the user's data function, factory or forward pass, marked by
    `errors.users_code`, else ckptavg's: a bug to report), then its traceback; with --json,
    stdout still holds {"error", "exit_code"}. Exit 1."""
    import traceback

    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    what = f"{type(e).__name__}{': ' + first if first else ''}"
    where = getattr(e, USER_CODE, None)
    line = (f"{where} raised {what} (your code: its traceback follows)" if where else
            f"internal error: {what} (a bug in ckptavg, please report it with the traceback "
            "that follows)")
    if as_json:
        emit_json({"error": line, "exit_code": 1})
    sys.stdout.flush()
    click.echo(f"ckptavg: error: {line}", err=True)
    traceback.print_exception(e, file=sys.stderr)
    sys.exit(1)
