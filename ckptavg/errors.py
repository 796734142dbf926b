"""The errors ckptavg raises for user mistakes.

Every message says what is wrong, where (file, key) and what to do. The CLI prints the
message as one line on stderr and exits 1; anything else that escapes is a bug and keeps
its traceback.
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
