import json
import os

import pytest
import torch

import ckptavg
from ckptavg.errors import CkptavgError
from ckptavg.options import Selection
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
    s = train(cfg(data, tmp_path / "a", holdout=8), device="cpu")
    assert [os.path.basename(p) for p in s.checkpoints] == [
        f"epoch-{i:04d}.safetensors" for i in range(1, 5)]
    meta = ckptavg.load(s.checkpoints[2])[1]
    assert meta["train.epoch"] == "3" and meta["train.phase"] == "swa"
    assert meta["train.step"] == "9" and meta["train.cycle_end"] == "true"  # 40 images / 16
    assert meta["model.arch"] == "tests.fakedata:tiny_bn" and meta["data.name"] == "fashion-mnist"
    assert meta["data.train_images"] == "40"  # 48 less the 8 held out
    assert meta["data.holdout"] == "8"
    assert json.loads(meta["model.kwargs"]) == {"in_channels": 1, "num_classes": 10}
    assert ckptavg.load(s.checkpoints[0])[1]["train.phase"] == "sgd"
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == 0.05 and rows[3]["lr"] == pytest.approx(0.01)
    assert all("test_acc" in r and "val_acc" in r for r in rows)
    last_state, last_meta = ckptavg.load(tmp_path / "a" / "last.pt")  # self-describing
    assert last_meta["train.epoch"] == "4" and last_meta["model.arch"] == "tests.fakedata:tiny_bn"
    final, _ = ckptavg.load(s.checkpoints[-1])
    assert all(torch.equal(final[k], last_state[k]) for k in final)
    assert s.to_dict()["epochs_run"] == 4 and s.last == rows[-1]


def test_resume_gives_the_same_weights(data, tmp_path):
    full = train(cfg(data, tmp_path / "full"), device="cpu")
    part = train(cfg(data, tmp_path / "part"), device="cpu", stop_after=2)
    assert part.epochs_run == 2
    rest = train(cfg(data, tmp_path / "part"), device="cpu", resume=True)
    assert rest.start_epoch == 2 and rest.epochs_run == 2
    a, _ = ckptavg.load(full.checkpoints[-1])
    b, _ = ckptavg.load(rest.checkpoints[-1])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the momentum buffers: the optimizer state of last.pt is the same
    fa = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["optimizer"]["state"]
    fb = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(fa[i]["momentum_buffer"], fb[i]["momentum_buffer"]) for i in fa)


def test_resume_state_handed_to_the_writer_is_a_copy(data, tmp_path, monkeypatch):
    """last.pt is written by a thread while training goes on: what it writes must be the
    state at the end of its epoch, not the live optimizer buffers of a later step."""
    import ckptavg.train.loop as loop

    handed = []
    monkeypatch.setattr(loop, "_save_resume", lambda state, path: handed.append(state))
    train(cfg(data, tmp_path / "live", swa_in_loop=True), device="cpu")
    monkeypatch.undo()
    train(cfg(data, tmp_path / "ref", swa_in_loop=True), device="cpu", stop_after=2)
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    at2 = handed[1]
    assert at2["epoch"] == 2
    for i, buf in ref["optimizer"]["state"].items():
        assert torch.equal(at2["optimizer"]["state"][i]["momentum_buffer"], buf["momentum_buffer"])
    for k, v in ref["swa_state"].items():
        assert torch.equal(at2["swa_state"][k], v), k


@pytest.mark.parametrize("change", [{"lr": 0.1}, {"batch_size": 8}, {"wd": 0.0},
                                    {"momentum": 0.5}, {"train_images": 32}, {"holdout": 8},
                                    {"model_kwargs": {"num_classes": 10}}, {"epochs": 6},
                                    {"swa_in_loop": True}])
def test_resume_with_other_settings_is_refused(data, tmp_path, change):
    train(cfg(data, tmp_path / "r"), device="cpu", stop_after=1)
    name, value = next(iter(change.items()))
    with pytest.raises(CkptavgError, match=f"resuming with {name}="):
        train(cfg(data, tmp_path / "r", **change), device="cpu", resume=True)
    # what may change between calls: where files are, workers, how often the test set is scored
    train(cfg(data, tmp_path / "r", eval_every=0, workers=0), device="cpu", resume=True,
          stop_after=1)


def test_a_non_empty_run_folder_needs_resume(data, tmp_path):
    train(cfg(data, tmp_path / "r"), device="cpu", stop_after=1)
    before = sorted(os.listdir(tmp_path / "r"))
    metrics = open(tmp_path / "r" / "metrics.jsonl").read()
    with pytest.raises(CkptavgError, match="not empty.*--resume"):
        train(cfg(data, tmp_path / "r", seed=4), device="cpu")
    assert sorted(os.listdir(tmp_path / "r")) == before
    assert open(tmp_path / "r" / "metrics.jsonl").read() == metrics
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CkptavgError, match="no last.pt"):
        train(cfg(data, tmp_path / "other"), device="cpu", resume=True)


def test_in_loop_swa_equals_torch_averaged_model(data, tmp_path):
    """Reference: torch.optim.swa_utils.AveragedModel fed the saved SWA-phase weights."""
    from torch.optim.swa_utils import AveragedModel

    from tests.fakedata import tiny_bn

    s = train(cfg(data, tmp_path / "s", epochs=5, swa_in_loop=True), device="cpu")
    net = tiny_bn()
    swa = AveragedModel(net)
    for path in s.checkpoints[1:]:  # epochs 2..5: the SWA phase
        net.load_state_dict(ckptavg.load(path)[0])
        swa.update_parameters(net)
    inloop, meta = ckptavg.load(s.swa_inloop)
    assert meta["average.n"] == "4" and int(swa.n_averaged) == 4
    for name, p in swa.module.named_parameters():
        torch.testing.assert_close(inloop[name], p.detach(), rtol=0, atol=1e-6)


def test_cyclic_schedule_saves_cycle_ends(data, tmp_path):
    s = train(cfg(data, tmp_path / "c", epochs=6, cycle=2, save="cycle-end"), device="cpu")
    assert [os.path.basename(p) for p in s.checkpoints] == [
        "epoch-0004.safetensors", "epoch-0006.safetensors"]
    rows = [json.loads(line) for line in open(tmp_path / "c" / "metrics.jsonl")]
    assert rows[3]["lr"] == pytest.approx(0.01)  # cycle end: alpha2
    assert rows[2]["lr"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.01)  # mid-cycle, last iteration
    r = ckptavg.average(s.checkpoints, dry_run=True, selection=Selection(cycle_ends=True))
    assert r.epochs == [4, 6]


def test_config_errors(data, tmp_path):
    with pytest.raises(CkptavgError, match=r"swa_start 7: an epoch in 1\.\.4 or a fraction"):
        train(cfg(data, tmp_path / "x", swa_start=7), device="cpu")
    with pytest.raises(CkptavgError, match="amp / device: mixed precision needs a CUDA device"):
        train(cfg(data, tmp_path / "x", amp=True), device="cpu")


def test_swa_defaults_and_a_fractional_start():
    """`train --model M --data D --epochs E --out DIR` works: SWA from 0.75 E at half the rate."""
    c = TrainConfig(model="m", data="d", epochs=20, out="x", lr=0.1).resolved()
    assert (c.swa_start, c.swa_lr) == (15, 0.05)
    c = TrainConfig(model="m", data="d", epochs=10, out="x", swa_start=0.25).resolved()
    assert c.swa_start == 3  # 2.5 rounds half up
    assert TrainConfig(model="m", data="d", epochs=10, out="x", swa_start=4).resolved().swa_start == 4


def test_validation_scores_are_in_the_metadata_and_select_the_best(data, tmp_path):
    s = train(cfg(data, tmp_path / "v", holdout=8), device="cpu")
    rows = [json.loads(line) for line in open(tmp_path / "v" / "metrics.jsonl")]
    for path, row in zip(s.checkpoints, rows):
        assert float(ckptavg.load(path)[1]["train.val_acc"]) == row["val_acc"]
    r = ckptavg.average(s.checkpoints, dry_run=True, selection=Selection(best=2, metric="train.val_loss", lowest=True))
    want = sorted(rows, key=lambda x: x["val_loss"])[:2]
    assert r.epochs == sorted(x["epoch"] for x in want)


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


def test_same_seed_and_thread_count_reproduce_the_run(data, tmp_path):
    """What a rerun needs to give the same numbers: the seed and the thread count (recorded
    as train.threads; another count changes the floating-point order of the reductions)."""
    before = torch.get_num_threads()
    a = train(cfg(data, tmp_path / "a", torch_threads=1), device="cpu")
    b = train(cfg(data, tmp_path / "b", torch_threads=1), device="cpu")
    assert torch.get_num_threads() == before
    sa, ma = ckptavg.load(a.checkpoints[-1])
    sb, _ = ckptavg.load(b.checkpoints[-1])
    assert ma["train.threads"] == "1"
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_commands_find_the_runs_data_folder_without_data_dir(data, tmp_path):
    """Issue #34, item 10: train records its data folder (data.dir), so bn-fix and eval of
    its files read the same images without --data-dir; a folder that is gone falls back to
    the default, which says where it looked."""
    from tests.conftest import run_cli

    s = train(cfg(data, tmp_path / "run", epochs=3), device="cpu")
    assert ckptavg.load(s.checkpoints[0])[1]["data.dir"] == os.path.abspath(data)
    env = {k: v for k, v in os.environ.items() if k != "CKPTAVG_DATA"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the default folder holds nothing
    model = ("--model", "tests.fakedata:tiny_bn")
    swa = tmp_path / "swa.safetensors"
    run_cli("average", *s.checkpoints[1:], "-o", swa, env=env, check=True)
    fixed = tmp_path / "fixed.safetensors"
    fix = run_cli("bn-fix", swa, *model, "-o", fixed, "--json", env=env)
    assert fix.returncode == 0, fix.stderr
    assert json.loads(fix.stdout)["samples"] == 48
    ev = run_cli("eval", fixed, *model, "--json", env=env)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["samples"] == 20
    os.rename(data, tmp_path / "moved")
    gone = run_cli("eval", fixed, *model, env=env)
    assert gone.returncode == 1 and str(tmp_path / "cache") in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr


def test_a_bin_output_keeps_the_stale_batchnorm_record(data, tmp_path):
    """A .bin is a bare state dict (from_pretrained's layout) that still holds the metadata
    (an attribute load_state_dict ignores): eval of an un-recalibrated average warns."""
    from tests.conftest import run_cli

    s = train(cfg(data, tmp_path / "run", epochs=3), device="cpu")
    out = tmp_path / "swa.bin"
    proc = run_cli("average", *s.checkpoints, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    raw = torch.load(out, weights_only=True)
    assert set(raw) == set(ckptavg.load(s.checkpoints[0])[0])  # the weights alone
    assert raw.ckptavg_metadata["bn.stale"] == "true"
    ev = run_cli("eval", out, "--model", "tests.fakedata:tiny_bn", "--json")
    assert ev.returncode == 0, ev.stderr
    assert any("bn.stale=true" in w for w in json.loads(ev.stdout)["warnings"])
