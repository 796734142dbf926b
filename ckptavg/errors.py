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

    def __init__(self, options: str | tuple[str, ...], message: str, value: object = _UNSET):
        self.options = (options,) if isinstance(options, str) else tuple(options)
        self.detail = message
        self.value = value
        super().__init__(self.render())

    def render(self, spell=None) -> str:
        """The message with each option spelled by `spell(name)` (default: the name)."""
        names = " / ".join((spell or str)(o) for o in self.options)
        head = names if self.value is _UNSET else f"{names} {self.value}"
        return f"{head}: {self.detail}"
