"""Shared fixtures: tiny known-value checkpoints written to tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def known_state(i: int) -> dict[str, torch.Tensor]:
    """Checkpoint i of a tiny BN net with values that are exact in binary (i/4 steps)."""
    g = torch.Generator().manual_seed(1000 + i)
    return {
        "conv.weight": (torch.randint(-64, 64, (4, 2, 3, 3), generator=g).float() / 4),
        "bn.weight": torch.full((4,), 1.0 + i),
        "bn.bias": torch.arange(4, dtype=torch.float32) * i,
        "bn.running_mean": torch.full((4,), float(i)),
        "bn.running_var": torch.full((4,), 2.0 * i),
        "bn.num_batches_tracked": torch.tensor(10 * i, dtype=torch.int64),
        "fc.weight": torch.randint(-8, 8, (3, 4), generator=g).to(torch.float16),
        "fc.bias": torch.randint(-8, 8, (3,), generator=g).to(torch.bfloat16),
    }


def write_safetensors(folder, n: int, start: int = 1, meta_extra=None) -> list[str]:
    paths = []
    for i in range(start, start + n):
        p = os.path.join(folder, f"epoch-{i:04d}.safetensors")
        meta = {"train.epoch": str(i), "model.arch": "tiny", "model.kwargs": "{}",
                "data.name": "fashion-mnist", **(meta_extra or {})}
        save_file(known_state(i), p, metadata=meta)
        paths.append(p)
    return paths


def reference_mean(states: list[dict], weights=None) -> dict[str, torch.Tensor]:
    """Float64 reference: sum w_i x_i / sum w_i, cast back; ints from the last state."""
    weights = weights or [1.0] * len(states)
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = sum(w * s[k].double() for w, s in zip(weights, states)) / sum(weights)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = states[-1][k].clone()
    return out


def run_cli(*args, env=None, check=False, timeout=300):
    """ckptavg as a real subprocess."""
    proc = subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def average_without_torch(paths, out) -> list[str]:
    """`ckptavg average PATHS -o OUT` in a fresh interpreter: [exit code, whether torch was
    imported], as it prints them."""
    script = ("import sys\nfrom click.testing import CliRunner\nfrom ckptavg.cli import cli\n"
              f"r = CliRunner().invoke(cli, ['average', *{[str(p) for p in paths]!r}, '-o', "
              f"{str(out)!r}, '-q'])\nprint(r.exit_code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.stdout, proc.stderr
    return proc.stdout.split()


@pytest.fixture
def ckpts(tmp_path):
    """Four known-value safetensors checkpoints, epochs 1..4."""
    return write_safetensors(tmp_path, 4)


def assert_state_equal(a: dict, b: dict) -> None:
    """Same keys (order aside: safetensors stores none; see test_pt_key_order_is_kept),
    dtypes, shapes and values."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def leftovers(folder) -> list[str]:
    """Temporary files, folders and staging folders a writer may have left behind."""
    return [f for f in os.listdir(folder) if f.startswith(".")
            and (".tmp" in f or ".old" in f or f.endswith(".ckptavg-partial"))]


def rezip(src, dst, edit) -> None:
    """Rewrite a zip (a torch file) record by record, stored, with `edit(name, data)` applied
    to each record's bytes; a record it returns None for is left out."""
    import zipfile

    with zipfile.ZipFile(src) as zin:
        items = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in items:
            data = edit(name, data)
            if data is not None:
                zout.writestr(name, data)
