"""The errors ckptavg raises for user mistakes.

Every message says what is wrong, where (file, key, option) and what to do. The CLI prints
the message as one line on stderr and exits with the error's code: 2 for an option's value
(OptionError, a usage error, like Click's own), 1 for a problem found in files or data;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class CkptavgError(Exception):
    """Base class: a problem the user can fix (bad input, bad option, missing file)."""

    exit_code = 1


class CheckpointError(CkptavgError):
    """A checkpoint cannot be read: missing, unknown format, refused pickle, no state dict."""


class MismatchError(CkptavgError):
    """Inputs disagree: keys, shapes or dtypes differ between checkpoints."""


class NonFiniteError(CkptavgError):
    """An input tensor holds NaN or Inf."""


class OutputError(CkptavgError):
    """The output cannot be written where asked (it is an input, bad suffix, ...)."""


class DataError(CkptavgError):
    """A data set cannot be found or read."""


class ModelError(CkptavgError):
    """A model cannot be built (unknown name, missing metadata, bad kwargs)."""


_UNSET = object()


class OptionError(CkptavgError):
    """An option's value is out of range, missing, or conflicts with another option: a usage
    error (exit 2). `options` are the library's parameter names; the CLI prints each as the
    flag the user typed (`last` -> `--last`), the library as it is (`last 0: ...`)."""

    exit_code = 2

    def __init__(self, options: str | tuple[str, ...], message: str, value: object = _UNSET,
                 mentions: tuple[str, ...] = ()):
        self.options = (options,) if isinstance(options, str) else tuple(options)
        self.detail = message
        self.value = value
        self.mentions = mentions  # other parameters the message names, spelled the same way
        super().__init__(self.render())

    def render(self, spell=None, typed=None) -> str:
        """The message with each option, and each parameter in `mentions` where the message
        names it, spelled by `spell(name)` (default: the name), and the value as `typed(name)`
        gives it, where it gives one (the CLI: as on the command line)."""
        import re

        names = " / ".join((spell or str)(o) for o in self.options)
        detail = self.detail
        for m in self.mentions if spell is not None else ():
            # the bare word only: not `quoted`, 'quoted' or an argument (split='train')
            detail = re.sub(rf"(?<![\w`'=-]){re.escape(m)}(?![\w`'=-])", spell(m), detail)
        value = self.value
        if value is not _UNSET and typed is not None:  # a value to show: as it was typed
            value = typed(self.options[0]) or value
        head = names if value is _UNSET else f"{names} {value}"
        return f"{head}: {detail}"


USER_CODE = "ckptavg_user_code"  # the attribute that marks an exception raised in a user's code


class users_code:  # noqa: N801 (a context manager, used as `with users_code(...)`)
    """Around a call into the user's own code (a data function, a model factory, a forward
    pass, a data set's batches): an exception from it that is not one of ours is marked with
    `what` (the innermost mark wins) and goes on unchanged, traceback and all. The CLI
    prints `what` on the line before the traceback, and under --json still writes
    {"error", "exit_code"} to stdout."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None and isinstance(error, Exception) \
                and not isinstance(error, CkptavgError) and not hasattr(error, USER_CODE):
            try:
                setattr(error, USER_CODE, self.what)
            except AttributeError:  # an exception type that takes no attributes
                pass
        return False


def user_batches(loader, what: str = "the data set (loading a batch)"):
    """The batches of `loader`, with an exception raised while making one marked as the
    user's code (`users_code`)."""
    it = iter(loader)
    while True:
        with users_code(what):
            try:
                batch = next(it)
            except StopIteration:
                return
        yield batch
