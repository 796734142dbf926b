"""matplotlib, imported only when a plot is asked for (the `plot` extra)."""

from __future__ import annotations

from ckptavg.errors import CkptavgError


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CkptavgError("plots need matplotlib: pip install 'ckptavg[plot]'") from None
    return plt
