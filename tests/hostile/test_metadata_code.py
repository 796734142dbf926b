"""Metadata is untrusted input: a file never makes ckptavg import or call code."""

from __future__ import annotations

import json

import pytest
import torch

import ckptavg
from ckptavg.errors import CkptavgError
from ckptavg.options import DataOptions
from tests.conftest import run_cli
from tests.fakedata import tiny_bn, write_mnist


def evil(tmp_path, meta: dict) -> str:
    p = tmp_path / "evil.safetensors"
    torch.manual_seed(0)
    ckptavg.save(tiny_bn().state_dict(), p, meta)
    return str(p)


@pytest.mark.parametrize("meta,needle", [
    ({"model.arch": "os:system", "model.kwargs": json.dumps({"command": "touch {marker}"}),
      "data.name": "fashion-mnist"}, "model.arch metadata names code"),
    ({"model.arch": "subprocess:getoutput", "model.kwargs": json.dumps({"cmd": "touch {marker}"}),
      "data.name": "fashion-mnist"}, "model.arch metadata names code"),
    ({"model.arch": "preresnet20", "data.name": "os:system"}, "data.name metadata names code"),
    ({"model.arch": "torchvision:resnet18", "model.kwargs": json.dumps({"weights": "DEFAULT"}),
      "data.name": "fashion-mnist"}, "ask to load weights"),
])
@pytest.mark.parametrize("command", ["eval", "bn-fix", "ensemble"])
def test_metadata_naming_code_is_refused(tmp_path, meta, needle, command):
    marker = tmp_path / "MARKER"
    write_mnist(str(tmp_path / "data"))
    meta = {k: v.replace("{marker}", str(marker)) for k, v in meta.items()}
    p = evil(tmp_path, meta)
    before = open(p, "rb").read()
    proc = run_cli(command, p, "--data-dir", tmp_path / "data")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckptavg: error: {p}: ") and needle in lines[0]
    assert not marker.exists() and open(p, "rb").read() == before


def test_the_refusal_says_how_to_trust_it_and_that_works(tmp_path):
    """The user naming the factory is trusting it: then it is built."""
    write_mnist(str(tmp_path / "data"))
    p = evil(tmp_path, {"model.arch": "tests.fakedata:tiny_bn", "data.name": "fashion-mnist"})
    with pytest.raises(CkptavgError, match="--model tests.fakedata:tiny_bn"):
        ckptavg.evaluate(p, data=DataOptions(data_dir=str(tmp_path / "data")))
    r = ckptavg.evaluate(p, data=DataOptions(data_dir=str(tmp_path / "data")), model="tests.fakedata:tiny_bn")
    assert r.samples == 32


def test_registry_and_zoo_names_from_metadata_are_built(tmp_path):
    write_mnist(str(tmp_path / "data"))
    p = evil(tmp_path, {"model.arch": "tiny_bn", "data.name": "fashion-mnist"})
    assert ckptavg.evaluate(p, data=DataOptions(data_dir=str(tmp_path / "data"))).samples == 32
