"""Runs that overlap: processes folding into one running average, and signals at several
moments of a real run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from tests.conftest import ROOT, leftovers


def test_concurrent_into_loses_no_update(tmp_path):
    """Six processes each fold one checkpoint into the same running average at once; with
    the lock the result holds all of them: n and the mean are exact."""
    vals = [float(i) for i in range(1, 8)]
    paths = []
    for v in vals:
        paths.append(tmp_path / f"c{int(v)}.safetensors")
        save_file({"w": torch.full((1000,), v, dtype=torch.float64)}, paths[-1])
    run = tmp_path / "run.safetensors"
    ckptavg.average([paths[0]], run)
    procs = [subprocess.Popen([sys.executable, "-m", "ckptavg", "average", str(p), "--into",
                               str(run), "-q"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for p in paths[1:]]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    got, meta = ckptavg.load(run)
    assert meta["average.n"] == str(len(vals))
    assert torch.equal(got["w"], torch.full((1000,), sum(vals) / len(vals), dtype=torch.float64))
    assert len(json.loads(meta["average.inputs"])) == len(vals)
    assert leftovers(tmp_path) == []


def _valid_or_absent(out, want):
    if not out.exists():
        return "absent"
    got, _ = ckptavg.load(out)
    assert torch.equal(got["w"], want)
    return "complete"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signals_at_several_moments_leave_old_output_or_new(tmp_path, sig):
    """The signal lands at 0.5-4 s: during import, reading or writing. Afterwards the output is
    the old one, the new complete one, or absent; never partial; no temporary file stays
    (except after SIGKILL, which no process can clean up after: the file is then hidden,
    dot-named, beside the output)."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({"w": torch.full((4 << 20,), float(i))}, paths[-1])  # 16 MB each
    want = torch.full((4 << 20,), 1.0)
    outcomes = set()
    for delay in (0.5, 1.5, 2.5, 4.0):
        out = tmp_path / "avg.safetensors"
        if out.exists():
            out.unlink()
        proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "average", *map(str, paths),
                                 "-o", str(out), "-q"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        outcomes.add(_valid_or_absent(out, want))
        if proc.returncode != 0 and sig == signal.SIGINT:
            # 130 once ckptavg runs; -2 when Ctrl-C lands while Python itself starts up
            assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
            if proc.returncode == 130:
                assert "Traceback" not in err, err
        if sig != signal.SIGKILL:
            assert leftovers(tmp_path) == [], (delay, err)
        for p in paths:  # inputs untouched
            assert os.path.getsize(p) > 16 << 20
    assert outcomes <= {"absent", "complete"}
