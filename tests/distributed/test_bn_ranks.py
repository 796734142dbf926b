"""`torchrun --nproc-per-node 2 -m ckptavg bn-fix`: the ranks share the data pass (batch i on
rank i % 2) and combine their statistics; the result equals one process."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

import ckptavg
from ckptavg.options import DataOptions, LoaderOptions
from tests.distributed.conftest import torchrun
from tests.fakedata import dropout_bn, tiny_bn, write_mnist


@pytest.mark.parametrize("stats", ["update_bn", "exact"])
@pytest.mark.parametrize("augment", [True, False])
def test_two_ranks_recalibrate_like_one_process(tmp_path, stats, augment):
    write_mnist(str(tmp_path / "data"), n_train=72, n_test=8)
    torch.manual_seed(0)
    ckpt = tmp_path / "swa.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ckpt, {"data.name": "fashion-mnist", "bn.stale": "true"})
    common = ["--model", "tests.fakedata:tiny_bn", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "8", "--stats", stats, "-q"]
    proc = torchrun("ckptavg", "bn-fix", ckpt, "-o", tmp_path / "two.safetensors", *common,
                    "--augment" if augment else "--no-augment")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = ckptavg.bn_fix(ckpt, tmp_path / "one.safetensors", stats=stats, augment=augment, model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=str(tmp_path / "data")), loader=LoaderOptions(batch_size=8))
    a, meta = ckptavg.load(tmp_path / "two.safetensors")
    b, _ = ckptavg.load(tmp_path / "one.safetensors")
    assert meta["bn.samples"] == "72" and one.samples == 72
    for k in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(a["0.weight"], b["0.weight"])


def test_each_rank_loads_only_its_batches_with_the_same_augmentations(tmp_path):
    """A user's data set that logs what it loads, random augmentation, dropout before the
    BatchNorm: 2 ranks read disjoint halves (batch i on rank i % 2) and write what one
    process writes; a different seed gives other statistics (the draws matter)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "m.safetensors"
    ckptavg.save(dropout_bn().state_dict(), ckpt, {"bn.stale": "true"})
    common = dict(model="tests.fakedata:dropout_bn", data="tests.fakedata:logged_images",
                  loader=LoaderOptions(batch_size=4))
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = torchrun("ckptavg", "bn-fix", ckpt, "-o", tmp_path / "two.safetensors", "--model",
                    common["model"], "--data", common["data"], "--batch-size", "4", "-q",
                    env={"CKPTAVG_TEST_LOG": str(logs)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What one process loads: the whole pass, plus the looks at image 0 that find the channels.
    one_log = tmp_path / "one-log"
    one_log.mkdir()
    os.environ["CKPTAVG_TEST_LOG"] = str(one_log)
    try:
        one = ckptavg.bn_fix(ckpt, tmp_path / "one.safetensors", **common)
    finally:
        del os.environ["CKPTAVG_TEST_LOG"]
    loaded = [int(x) for x in (one_log / "loaded-0.txt").read_text().split()]
    peeks = loaded.count(0) - 1
    assert sorted(loaded) == sorted(list(range(30)) + [0] * peeks)
    # 8 batches of 4 (the last of 2) in the seed's order; rank r loads batches r, r + 2, ...
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    for r in (0, 1):
        mine = [j for i in range(r, 8, 2) for j in order[4 * i:4 * i + 4]]
        read = [int(x) for x in (logs / f"loaded-{r}.txt").read_text().split()]
        assert Counter(read) == Counter(mine + [0] * peeks), r
    ckptavg.bn_fix(ckpt, tmp_path / "other.safetensors", seed=1, **common)
    a, _ = ckptavg.load(tmp_path / "two.safetensors")
    b, _ = ckptavg.load(tmp_path / "one.safetensors")
    c, _ = ckptavg.load(tmp_path / "other.safetensors")
    assert one.samples == 30
    for k in ("2.running_mean", "2.running_var"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(b[k], c[k], rtol=1e-3, atol=1e-4)


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
    one = ckptavg.evaluate(ckpt, model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=str(tmp_path / "data")), loader=LoaderOptions(batch_size=8))
    assert two["samples"] == one.samples == 44  # 6 batches: 3 per rank, the last one of 4
    assert two["accuracy"] == pytest.approx(one.accuracy)
    assert two["loss"] == pytest.approx(one.loss, rel=1e-6)
