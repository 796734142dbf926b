"""Checkpoints written by the real libraries, averaged by the CLI, loaded back by the
library's own loader, compared with a float64 mean computed here."""

from __future__ import annotations

import torch

from tests.conftest import run_cli


def float64_mean(states: list[dict]) -> dict:
    """The reference average: float tensors as float64 means, others from the newest."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = states[-1][k]
    return out


def assert_matches(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


def cli_ok(*args) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
