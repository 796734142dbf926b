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


def _temp_output(folder) -> bool:
    return any(f.startswith(".avg.safetensors.") and f.endswith(".tmp") for f in os.listdir(folder))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signals_interrupt_a_run_and_leave_the_old_output(tmp_path, sig):
    """The signal lands while the run is really running: during startup, and while the
    output is being written (its temporary file seen). The run must not have finished (it
    is checked: exit status of the signal), the old output must be untouched, the inputs
    too, and no temporary file stays (except after SIGKILL, which no process can clean up
    after: the file is then hidden, dot-named, beside the output)."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({"w": torch.full((24 << 20,), float(i))}, paths[-1])  # 96 MB each
    out = tmp_path / "avg.safetensors"
    save_file({"w": torch.zeros(4)}, out, {"average.n": "1"})  # an earlier output of ours
    old = out.read_bytes()
    expected = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130,
                signal.SIGKILL: -signal.SIGKILL}[sig]
    for moment in ("startup", "writing"):
        proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "average", *map(str, paths),
                                 "-o", str(out), "-q", "--arith-threads", "1"], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)
        if moment == "writing":
            deadline = time.monotonic() + 60
            while not _temp_output(tmp_path) and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            assert _temp_output(tmp_path), "the run never started writing"
        else:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        # really interrupted: never a run that had finished (exit 0) before the signal
        ok = {expected}
        if moment == "startup":  # Python's own default handlers, before ckptavg's are set
            ok |= {-sig}
        assert proc.returncode in ok, (moment, proc.returncode, err)
        if proc.returncode in (130, 143):
            assert "Traceback" not in err, err
        assert out.read_bytes() == old, moment  # the old output, untouched
        if sig != signal.SIGKILL:
            assert leftovers(tmp_path) == [], (moment, err)
        else:
            for f in leftovers(tmp_path):
                os.remove(tmp_path / f)
        for p in paths:  # inputs untouched
            assert os.path.getsize(p) > 96 << 20
