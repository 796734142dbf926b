"""Smaller items of issue #33 (item 8), each through the real CLI: the running average among
its own inputs, a wrapper prefix asked for after it was stripped, an empty epoch window, and
a peak RSS that is this process's own."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_cli


def _epochs(tmp_path, n=3):
    paths = []
    for i in range(1, n + 1):
        p = tmp_path / f"e{i}.safetensors"
        save_file({"w": torch.full((3,), float(i))}, str(p), metadata={"train.epoch": str(i)})
        paths.append(p)
    return paths


def test_the_running_average_among_its_inputs_is_said_and_counted_truly(tmp_path):
    e1, e2, e3 = _epochs(tmp_path)
    run = tmp_path / "run.safetensors"
    run_cli("average", e1, e2, "-o", run, check=True)
    proc = run_cli("average", e3, run, "--into", run)
    assert proc.returncode == 0, proc.stderr
    assert "the running average of --into among the inputs; left out" in proc.stderr
    assert "folded 1 new checkpoint(s)" in proc.stdout, proc.stdout
    with safe_open(str(run), "np") as f:
        assert f.metadata()["average.n"] == "3"
    assert torch.equal(load_file(str(run))["w"], torch.full((3,), 2.0))


def test_strip_prefix_of_a_wrapper_already_stripped_is_accepted(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"ddp{i}.pt"
        torch.save({"module.w": torch.full((2,), float(i)), "module.b": torch.ones(1)}, p)
        paths.append(p)
    out = tmp_path / "o.safetensors"
    proc = run_cli("average", *paths, "-o", out, "--strip-prefix", "module.")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(out))["w"], torch.full((2,), 0.5))


def test_an_empty_epoch_window_names_the_option_and_the_epochs_found(tmp_path):
    paths = _epochs(tmp_path)
    proc = run_cli("average", *paths, "-o", tmp_path / "o.safetensors", "--from-epoch", "99")
    assert proc.returncode == 2, proc.stderr
    assert "--from-epoch" in proc.stderr and "from 1 to 3" in proc.stderr, proc.stderr
    proc = run_cli("average", *paths, "-o", tmp_path / "o.safetensors", "--from-epoch", "3",
                   "--to-epoch", "1")
    assert proc.returncode == 2, proc.stderr
    assert "--from-epoch" in proc.stderr and "--to-epoch" in proc.stderr, proc.stderr


def test_peak_rss_is_this_processs_own_not_its_parents(tmp_path):
    """A parent holding 1 GB starts the average: the reported peak is the child's."""
    paths = _epochs(tmp_path, 2)
    script = (
        "import subprocess, sys\n"
        "hold = b'x' * (1 << 30)\n"
        f"print(subprocess.run([sys.executable, '-m', 'ckptavg', 'average', {str(paths[0])!r}, "
        f"{str(paths[1])!r}, '-o', {str(tmp_path / 'o.safetensors')!r}, '--json'], "
        "capture_output=True, text=True).stdout)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout)["peak_rss_bytes"]
    assert 0 < peak < 600 << 20, peak
