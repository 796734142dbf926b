"""`ckptavg verify OUT`: an output re-derived from its recorded recipe, compared bit for bit.

Tampering is done on disk, byte by byte, where the test knows the tensor's offset (read
from the safetensors header here, not by ckptavg)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ckptavg
from ckptavg.cli import cli


def _inputs(folder, n=4, fmt="safetensors", seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = []
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        state = {"w": torch.randn(20, 30, generator=g), "b": torch.randn(30, generator=g)
                 .to(torch.bfloat16), "steps": torch.tensor(i)}
        p = os.path.join(folder, f"epoch-{i + 1}.{fmt}")
        if fmt == "safetensors":
            save_file(state, p, metadata={"train.epoch": str(i + 1)})
        else:
            torch.save({"state_dict": state, "epoch": i + 1}, p)
        paths.append(p)
    return paths


def _offset(path, key):
    """Where tensor `key`'s bytes start in a safetensors file, from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return 8 + n + header[key]["data_offsets"][0]


@pytest.mark.parametrize("fmt,out,kw", [
    ("safetensors", "avg.safetensors", {}),
    ("pt", "avg.pt", {}),
    ("safetensors", "avg-folder", {"shard_size": 1500}),
    ("safetensors", "avg.safetensors", {"dtype": "float16", "accumulate": "float32"}),
    ("safetensors", "avg.safetensors", {"profile": "ema:halflife=1"}),
    ("pt", "avg.safetensors", {"ema": 0.7}),
    ("safetensors", "avg.safetensors", {"weights": [1, 2, 3, 0.5]}),
])
def test_outputs_verify(tmp_path, fmt, out, kw):
    paths = _inputs(tmp_path / "runs", fmt=fmt)
    ckptavg.average(paths, tmp_path / out, **kw)
    r = ckptavg.verify(tmp_path / out)
    assert r.status == "verified" and r.exit_code == 0, r.problems
    assert r.tensors == 3 and r.inputs == paths


def test_sweep_windows_verify(tmp_path):
    paths = _inputs(tmp_path / "runs", n=6)
    r = ckptavg.average(paths, tmp_path / "sweep", sweep="window=3")
    for w in r.windows:
        assert ckptavg.verify(w.output).status == "verified"


def test_a_changed_output_tensor_differs(tmp_path):
    paths = _inputs(tmp_path / "runs")
    out = str(tmp_path / "avg.safetensors")
    ckptavg.average(paths, out)
    at = _offset(out, "b") + 6
    with open(out, "r+b") as f:  # flip one bit of one bfloat16 value
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))
    r = ckptavg.verify(out)
    assert r.status == "differs" and r.exit_code == 1
    assert r.differing == ["b"] and "b" in r.problems[-1]


def test_changed_or_missing_inputs_are_named(tmp_path):
    paths = _inputs(tmp_path / "runs")
    out = tmp_path / "avg.safetensors"
    ckptavg.average(paths, out)
    # a different checkpoint under the same name
    other = _inputs(tmp_path / "other", seed=9)
    shutil.copy(other[2], paths[2])
    r = ckptavg.verify(out)
    assert r.status == "inputs-changed" and r.exit_code == 3
    assert any(paths[2] in p and "not the file that was averaged" in p for p in r.problems)
    os.remove(paths[2])
    r = ckptavg.verify(out)
    assert r.status == "inputs-changed"
    assert any("epoch-3.safetensors: missing" in p for p in r.problems)


def test_same_tensors_rewritten_still_verify(tmp_path):
    """A copy of an input (new identity, same tensors) is the same checkpoint."""
    paths = _inputs(tmp_path / "runs")
    out = tmp_path / "avg.safetensors"
    ckptavg.average(paths, out)
    shutil.copy(paths[1], str(paths[1]) + ".bak")
    os.replace(str(paths[1]) + ".bak", paths[1])
    assert ckptavg.verify(out).status == "verified"


def test_moved_tree_and_moved_inputs(tmp_path):
    paths = _inputs(tmp_path / "a" / "runs")
    ckptavg.average(paths, tmp_path / "a" / "avg.safetensors")
    shutil.move(tmp_path / "a", tmp_path / "b")  # the recipe's paths are relative
    assert ckptavg.verify(tmp_path / "b" / "avg.safetensors").status == "verified"
    shutil.move(tmp_path / "b" / "avg.safetensors", tmp_path / "avg.safetensors")
    assert ckptavg.verify(tmp_path / "avg.safetensors").status == "inputs-changed"
    r = ckptavg.verify(tmp_path / "avg.safetensors", [str(tmp_path / "b" / "runs" / "*")])
    assert r.status == "verified"


def test_no_recipe(tmp_path):
    paths = _inputs(tmp_path / "runs")
    assert ckptavg.verify(paths[0]).status == "no-recipe"
    into = tmp_path / "run.safetensors"
    ckptavg.average(paths[:2], into)
    ckptavg.average(paths[2:], into=into)
    r = ckptavg.verify(into)
    assert r.status == "no-recipe" and r.exit_code == 4


def test_metadata_names_no_absolute_path(tmp_path):
    paths = _inputs(tmp_path / "runs")
    out = tmp_path / "avg.safetensors"
    ckptavg.average(paths, out)
    _, meta = ckptavg.load(out)
    assert json.loads(meta["average.recipe"])["inputs"] == [
        "runs/epoch-1.safetensors", "runs/epoch-2.safetensors", "runs/epoch-3.safetensors",
        "runs/epoch-4.safetensors"]
    assert str(tmp_path) not in json.dumps(meta)


def test_cli_exit_codes(tmp_path):
    paths = _inputs(tmp_path / "runs")
    out = str(tmp_path / "avg.safetensors")
    ckptavg.average(paths, out)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ckptavg", "verify", *args],
                              capture_output=True, text=True)

    res = run(out)
    assert res.returncode == 0 and res.stdout.startswith("verified:"), res.stderr
    res = CliRunner().invoke(cli, ["verify", out, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["status"] == "verified"
    os.remove(paths[0])
    res = run(out)
    assert res.returncode == 3 and "missing" in res.stdout
    res = run(paths[1])
    assert res.returncode == 4 and "no average.recipe" in res.stdout
    res = run(str(tmp_path / "nope.safetensors"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
