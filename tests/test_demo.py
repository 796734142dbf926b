import json
import os

import pytest
import torch
from click.testing import CliRunner

import ckptavg
from ckptavg.cli import cli
from ckptavg.experiments.demo import demo_data_dir


def test_shipped_subset_is_complete():
    files = sorted(os.listdir(demo_data_dir()))
    assert files == ["LICENSE", "README.md", "t10k-images-idx3-ubyte.gz",
                     "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                     "train-labels-idx1-ubyte.gz"]
    assert sum(os.path.getsize(os.path.join(demo_data_dir(), f)) for f in files) < 4_000_000


def test_demo_short_run_keeps_files(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--epochs", "2", "-o", str(tmp_path), "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["epochs"] == 2 and res["swa_start"] == 1 and res["averaged"] == 2
    assert res["swa"]["samples"] == 2000 and res["bn_samples"] == 6000
    # Two epochs on 6000 images learn Fashion-MNIST well past chance (10 %); a broken
    # pipeline (stale BatchNorm, shuffled labels, wrong weights) does not.
    assert res["last_iterate"]["accuracy"] > 50 and res["swa"]["accuracy"] > 50
    assert res["sgd"]["accuracy"] > 50 and res["sgd"]["samples"] == 2000
    sgd_meta = ckptavg.load(tmp_path / "sgd" / "epoch-0002.safetensors")[1]
    assert sgd_meta["train.schedule"] == "sgd" and sgd_meta["train.seed"] == "0"
    # The average is the float64 mean of the two epochs, computed here.
    swa, meta = ckptavg.load(tmp_path / "swa.safetensors")
    e1, e2 = (ckptavg.load(tmp_path / "run" / f"epoch-000{i}.safetensors")[0] for i in (1, 2))
    for k, v in swa.items():
        if "running" not in k and v.is_floating_point():
            torch.testing.assert_close(v, ((e1[k].double() + e2[k]) / 2).float(), rtol=0, atol=1e-7)
    assert meta["bn.stale"] == "false" and meta["average.n"] == "2"


def test_demo_epochs_zero_is_refused():
    r = CliRunner().invoke(cli, ["demo", "--epochs", "0"])
    assert r.exit_code == 2 and "--epochs" in r.output


@pytest.mark.slow  # 190 s of a 9.5-minute default run: kept under 10 minutes (session 7)
def test_full_demo_as_the_readme_quotes_it():
    """The whole demo (about 90 s alone, 190 s beside the other tests): the average beats the weights it averages by more than a
    point; the SGD baseline is a real SGD-schedule run (at this scale it beats SWA, and the
    README says so)."""
    r = CliRunner().invoke(cli, ["demo", "--json"], catch_exceptions=False)
    res = json.loads(r.stdout)
    assert res["epochs"] == 32 and res["averaged"] == 13
    assert res["swa"]["accuracy"] > res["last_iterate"]["accuracy"] + 1
    assert res["sgd"]["accuracy"] > 80
