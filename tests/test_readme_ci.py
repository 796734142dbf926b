"""The README's CI-pipeline script (issue #34), run as written in a user's folder: a plain
PyTorch loop's runs/epoch-N.pt, the user's factory and data function, `set -e`, every
--json parsed, a gate on the test accuracy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.test_user_loop import make_user


def _script() -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("### In a CI pipeline", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)


def _run(folder, **env):
    bin_dir = os.path.dirname(sys.executable)  # where `ckptavg` and `python` are installed
    return subprocess.run(["bash", "-c", _script()], cwd=folder, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": bin_dir + os.pathsep
                                            + os.environ["PATH"], "PYTHONPATH": ROOT, **env})


@pytest.fixture
def user(tmp_path):
    return make_user(tmp_path)


def test_the_readme_ci_script_gates_on_the_accuracy_and_reruns(user):
    gate = _run(user, MIN_ACC="101")  # above any accuracy: the gate fails
    assert gate.returncode == 3, gate.stderr
    acc = json.loads((user / "eval.json").read_text())["accuracy"]
    assert 0 <= acc <= 100 and f"SWA test accuracy {acc:.2f} %" in gate.stdout
    average = json.loads((user / "average.json").read_text())
    assert [os.path.basename(p) for p in average["inputs"]] == [
        "epoch-2.pt", "epoch-3.pt", "epoch-4.pt"]
    # the file is the user's own float64 mean of those epochs (BatchNorm's buffers aside:
    # bn-fix recomputes them in swa-bn.pt)
    states = [torch.load(user / "runs" / f"epoch-{e}.pt")["model_state_dict"] for e in (2, 3, 4)]
    swa = torch.load(user / "swa.pt", weights_only=True)["model_state_dict"]
    for k, v in swa.items():
        if v.is_floating_point():
            want = sum(s[k].double() for s in states) / 3
            assert torch.allclose(v.double(), want, rtol=0, atol=1e-6), k
    assert json.loads((user / "bn-fix.json").read_text())["samples"] == 40
    ok = _run(user, MIN_ACC="0")  # run again: the outputs of the first run are replaced
    assert ok.returncode == 0, ok.stderr
    assert json.loads((user / "eval.json").read_text())["accuracy"] == acc


def test_a_mistake_stops_the_script_with_its_exit_code_and_json(user):
    script = (user / "mymodule.py").read_text().replace("def data(", "def data_renamed(")
    (user / "mymodule.py").write_text(script)
    proc = _run(user, MIN_ACC="0")
    assert proc.returncode == 2, proc.stderr  # --data names nothing: a usage error
    body = json.loads((user / "bn-fix.json").read_text())
    assert body["exit_code"] == 2 and "--data" in body["error"]
    assert not (user / "eval.json").exists()
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ckptavg: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
