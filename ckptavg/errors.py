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
            detail = re.sub(rf"(?<![\w-]){re.escape(m)}(?![\w-])", spell(m), detail)
        value = self.value
        if value is not _UNSET and typed is not None:  # a value to show: as it was typed
            value = typed(self.options[0]) or value
        head = names if value is _UNSET else f"{names} {value}"
        return f"{head}: {detail}"
