"""The `ckptavg` command: one Click group, each subcommand one call of the Python API.

This package is the only place that prints, draws progress bars or exits. It imports torch
only inside commands, so `ckptavg --help` stays fast; `average` imports it only when a
torch format is read or written (averaging safetensors files never needs it).

    app.py       the group, how commands run and how errors leave, `main`
    options.py   Click options from the library's option classes, and the shared ones
    output.py    progress bars, text lines, JSON
    files.py     average, inspect, swag, models
    scoring.py   bn-fix, eval, ensemble, soup, search
    runs.py      train, demo, width, replicate, beyond, ablation
"""

from ckptavg.cli import files, runs, scoring  # noqa: F401  (registers the commands)
from ckptavg.cli.app import _import_torch_holding_signals, cli, main
from ckptavg.cli.options import parse_size

__all__ = ["_import_torch_holding_signals", "cli", "main", "parse_size"]
