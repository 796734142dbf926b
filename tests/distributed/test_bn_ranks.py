"""`torchrun --nproc-per-node 2 -m ckptavg bn-fix`: the ranks share the data pass (batch i on
rank i % 2) and combine their statistics; the result equals one process."""

from __future__ import annotations

import pytest
import torch

import ckptavg
from tests.distributed.conftest import torchrun
from tests.fakedata import tiny_bn, write_mnist


@pytest.mark.parametrize("stats", ["update_bn", "exact"])
def test_two_ranks_recalibrate_like_one_process(tmp_path, stats):
    write_mnist(str(tmp_path / "data"), n_train=72, n_test=8)
    torch.manual_seed(0)
    ckpt = tmp_path / "swa.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ckpt, {"data.name": "fashion-mnist", "bn.stale": "true"})
    common = ["--model", "tests.fakedata:tiny_bn", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "8", "--stats", stats, "--no-augment", "-q"]
    proc = torchrun("ckptavg", "bn-fix", ckpt, "-o", tmp_path / "two.safetensors", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = ckptavg.bn_fix(ckpt, tmp_path / "one.safetensors", model="tests.fakedata:tiny_bn",
                         data_dir=str(tmp_path / "data"), batch_size=8, stats=stats,
                         augment=False)
    a, meta = ckptavg.load(tmp_path / "two.safetensors")
    b, _ = ckptavg.load(tmp_path / "one.safetensors")
    assert meta["bn.samples"] == "72" and one.samples == 72
    for k in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(a["0.weight"], b["0.weight"])


def test_two_ranks_evaluate_like_one_process(tmp_path):
    import json

    write_mnist(str(tmp_path / "data"), n_train=16, n_test=44)
    torch.manual_seed(1)
    ckpt = tmp_path / "m.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ckpt, {"data.name": "fashion-mnist"})
    proc = torchrun("ckptavg", "eval", ckpt, "--model", "tests.fakedata:tiny_bn", "--data-dir",
                    tmp_path / "data", "--batch-size", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # one report: rank 0's
    one = ckptavg.evaluate(ckpt, model="tests.fakedata:tiny_bn", data_dir=str(tmp_path / "data"),
                           batch_size=8)
    assert two["samples"] == one.samples == 44  # 6 batches: 3 per rank, the last one of 4
    assert two["accuracy"] == pytest.approx(one.accuracy)
    assert two["loss"] == pytest.approx(one.loss, rel=1e-6)
