import json
import os

import pytest
import torch

import ckptavg
from ckptavg.errors import CkptavgError
from ckptavg.train import CheckpointSaver, TrainConfig, train
from tests.fakedata import write_mnist


@pytest.fixture
def data(tmp_path):
    write_mnist(str(tmp_path / "data"), n_train=48, n_test=20)
    return str(tmp_path / "data")


def cfg(data, out, **kw):
    base = dict(model="tests.fakedata:tiny_bn", data="fashion-mnist", data_dir=data, epochs=4,
                out=str(out), schedule="swa", lr=0.05, swa_start=2, swa_lr=0.01, batch_size=16,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoints_metadata_and_metrics(data, tmp_path):
    s = train(cfg(data, tmp_path / "a"), device="cpu")
    assert [os.path.basename(p) for p in s["checkpoints"]] == [
        f"epoch-{i:04d}.safetensors" for i in range(1, 5)]
    meta = ckptavg.load(s["checkpoints"][2])[1]
    assert meta["train.epoch"] == "3" and meta["train.phase"] == "swa"
    assert meta["train.step"] == "9" and meta["train.cycle_end"] == "true"
    assert meta["model.arch"] == "tests.fakedata:tiny_bn" and meta["data.name"] == "fashion-mnist"
    assert json.loads(meta["model.kwargs"]) == {"in_channels": 1, "num_classes": 10}
    assert ckptavg.load(s["checkpoints"][0])[1]["train.phase"] == "sgd"
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == 0.05 and rows[3]["lr"] == pytest.approx(0.01)
    assert all("test_acc" in r for r in rows)
    last_state, last_meta = ckptavg.load(tmp_path / "a" / "last.pt")  # self-describing
    assert last_meta["train.epoch"] == "4" and last_meta["model.arch"] == "tests.fakedata:tiny_bn"
    final, _ = ckptavg.load(s["checkpoints"][-1])
    assert all(torch.equal(final[k], last_state[k]) for k in final)


def test_resume_gives_the_same_weights(data, tmp_path):
    full = train(cfg(data, tmp_path / "full"), device="cpu")
    part = train(cfg(data, tmp_path / "part"), device="cpu", stop_after=2)
    assert part["epochs_run"] == 2
    rest = train(cfg(data, tmp_path / "part"), device="cpu", resume=True)
    assert rest["start_epoch"] == 2 and rest["epochs_run"] == 2
    a, _ = ckptavg.load(full["checkpoints"][-1])
    b, _ = ckptavg.load(rest["checkpoints"][-1])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_other_options_is_refused(data, tmp_path):
    train(cfg(data, tmp_path / "r"), device="cpu", stop_after=1)
    with pytest.raises(CkptavgError, match="--resume with lr=0.1"):
        train(cfg(data, tmp_path / "r", lr=0.1), device="cpu", resume=True)


def test_offline_average_equals_in_loop_swa(data, tmp_path):
    s = train(cfg(data, tmp_path / "s", epochs=5, swa_in_loop=True), device="cpu")
    offline = tmp_path / "offline.safetensors"
    ckptavg.average(s["checkpoints"], offline, from_epoch=2)
    a, ma = ckptavg.load(offline)
    b, mb = ckptavg.load(s["swa_inloop"])
    assert ma["average.n"] == mb["average.n"] == "4"
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).abs().max().item() <= 1e-6, k


def test_cyclic_schedule_saves_cycle_ends(data, tmp_path):
    s = train(cfg(data, tmp_path / "c", epochs=6, cycle=2, save="cycle-end"), device="cpu")
    assert [os.path.basename(p) for p in s["checkpoints"]] == [
        "epoch-0004.safetensors", "epoch-0006.safetensors"]
    rows = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert rows[3]["lr"] == pytest.approx(0.01)  # cycle end: alpha2
    assert rows[2]["lr"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.01)  # mid-cycle, last iteration
    r = ckptavg.average(s["checkpoints"], dry_run=True, cycle_ends=True)
    assert r.epochs == [4, 6]


def test_config_errors(data, tmp_path):
    with pytest.raises(CkptavgError, match="needs --swa-start and --swa-lr"):
        train(cfg(data, tmp_path / "x", swa_start=None), device="cpu")
    with pytest.raises(CkptavgError, match="--amp needs a CUDA device"):
        train(cfg(data, tmp_path / "x", amp=True), device="cpu")


def test_saver_in_a_users_loop(tmp_path):
    net = torch.nn.Linear(3, 2)
    with CheckpointSaver(tmp_path / "run", model_arch="x", data_name="d") as saver:
        for epoch in (1, 2):
            with torch.no_grad():
                net.weight.add_(1)
            saver.save(net, epoch=epoch, lr=0.1, phase="swa", cycle_end=True)
    state, meta = ckptavg.load(tmp_path / "run" / "epoch-0002.safetensors")
    assert torch.equal(state["weight"], net.weight.detach())
    assert meta["train.epoch"] == "2" and meta["train.lr"] == "0.1"


def test_saver_surfaces_write_errors():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        saver = CheckpointSaver(d)
        saver.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            saver.flush()
        saver.close()
