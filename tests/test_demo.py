import json
import os

import pytest
from click.testing import CliRunner

from ckptavg.cli import cli
from ckptavg.demo import demo_data_dir


def test_shipped_subset_is_complete():
    files = sorted(os.listdir(demo_data_dir()))
    assert files == ["LICENSE", "README.md", "t10k-images-idx3-ubyte.gz",
                     "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                     "train-labels-idx1-ubyte.gz"]
    assert sum(os.path.getsize(os.path.join(demo_data_dir(), f)) for f in files) < 4_000_000


def test_demo_short_run_keeps_files(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--epochs", "2", "--out", str(tmp_path), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["epochs"] == 2 and res["swa_start"] == 1 and res["averaged"] == 2
    assert res["test_samples"] == 2000 and res["bn_samples"] == 6000
    assert 10 < res["sgd"]["accuracy"] <= 100 and 10 < res["swa"]["accuracy"] <= 100
    assert os.path.exists(tmp_path / "swa.safetensors")
    assert os.path.exists(tmp_path / "run" / "epoch-0002.safetensors")


@pytest.mark.slow
def test_full_demo_swa_beats_final_sgd():
    r = CliRunner().invoke(cli, ["demo", "--json"], catch_exceptions=False)
    res = json.loads(r.stdout)
    assert res["swa"]["accuracy"] > res["sgd"]["accuracy"]
