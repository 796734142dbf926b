"""Where each input sits in training: read from the checkpoint, never a step for an epoch."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.engine.select import name_position
from ckptavg.errors import CkptavgError
from ckptavg.options import Selection


def _lightning(folder, epochs_per_step=4, n=4):
    """Files as Lightning's ModelCheckpoint names and fills them: epoch is 0-based."""
    paths = []
    for e in range(n):
        step = (e + 1) * epochs_per_step
        p = folder / f"epoch={e}-step={step}.ckpt"
        torch.save({"epoch": e, "global_step": step, "pytorch-lightning_version": "2.6.0",
                    "state_dict": {"model.w": torch.full((3,), float(e))},
                    "optimizer_states": [{"state": {}}]}, p)
        paths.append(p)
    return paths


def test_lightning_epochs_and_steps_come_from_the_checkpoint(tmp_path):
    paths = _lightning(tmp_path)
    r = ckptavg.average(paths, dry_run=True, selection=Selection(from_epoch=1))
    assert r.epochs == [1, 2, 3] and r.steps == [8, 12, 16]
    assert set(r.epoch_sources) == {"checkpoint entry 'epoch'"}
    assert set(r.step_sources) == {"checkpoint entry 'global_step'"}
    assert ckptavg.average(paths, dry_run=True, selection=Selection(to_epoch=1)).epochs == [0, 1]
    assert ckptavg.average(paths, dry_run=True, selection=Selection(from_step=9, to_step=12)).steps == [12]


def test_hugging_face_checkpoint_folders_are_steps(tmp_path):
    for step, epoch in ((500, 1.0), (1000, 2.0), (1500, 2.5)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.full((2,), float(step))}, d / "model.safetensors")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch}))
    paths = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    r = ckptavg.average(paths, dry_run=True)
    assert r.steps == [500, 1000, 1500] and r.epochs == [1, 2, None]  # 2.5 is no epoch
    assert r.step_sources[0] == "trainer_state.json global_step"
    assert ckptavg.average(paths, dry_run=True, selection=Selection(from_step=1000)).steps == [1000, 1500]
    with pytest.raises(CkptavgError, match="epoch unknown .*it has a step, 1500.*select by step"):
        ckptavg.average(paths, dry_run=True, selection=Selection(from_epoch=1))
    # without trainer_state.json the folder name still says step, never epoch
    for p in paths:
        os.unlink(p / "trainer_state.json")
    r = ckptavg.average(paths, dry_run=True)
    assert r.steps == [500, 1000, 1500] and r.epochs == [None] * 3
    assert set(r.step_sources) == {"name"}


def _pos(name):
    p = name_position(name)
    return p.epoch, p.step


def test_names_say_epoch_or_step():
    assert _pos("epoch=3-step=120.ckpt") == (3, 120)
    assert _pos("step-500.safetensors") == (None, 500)
    assert _pos("epoch-0012.safetensors") == (12, None)
    assert _pos("swa_10.pt") == (10, None)
    assert _pos("last.pt") == (None, None)
    assert _pos("model.safetensors") == (None, None)


def test_ckptavg_metadata_wins_over_the_name(tmp_path):
    p = tmp_path / "epoch-0099.safetensors"
    save_file({"w": torch.zeros(2)}, p, {"train.epoch": "7", "train.step": "70"})
    r = ckptavg.average([p], dry_run=True)
    assert (r.epochs, r.steps) == ([7], [70])
    assert r.epoch_sources == ["metadata train.epoch"]


def test_dry_run_prints_where_each_number_came_from(tmp_path):
    from click.testing import CliRunner

    from ckptavg.cli import cli

    paths = _lightning(tmp_path, n=2)
    res = CliRunner().invoke(cli, ["average", *map(str, paths), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "epoch      1 (checkpoint entry 'epoch')" in res.output
    assert "step      8 (checkpoint entry 'global_step')" in res.output


def test_best_by_a_number_stored_in_the_checkpoint(tmp_path):
    """timm keeps the eval metric in each checkpoint as `metric`."""
    paths = []
    for e, m in enumerate([70.0, 75.5, 71.0, 74.0]):
        paths.append(tmp_path / f"checkpoint-{e}.pth.tar")
        torch.save({"state_dict": {"w": torch.full((2,), float(e))}, "epoch": e, "metric": m},
                   paths[-1])
    r = ckptavg.average(paths, dry_run=True, selection=Selection(best=2, metric="metric"))
    assert r.epochs == [1, 3]  # 75.5 and 74.0, kept in training order
    with pytest.raises(CkptavgError, match="no stored 'val_acc'"):
        ckptavg.average(paths, dry_run=True, selection=Selection(best=2, metric="val_acc"))
    with pytest.raises(CkptavgError, match="best N ranks by a stored score"):
        ckptavg.average(paths, dry_run=True, selection=Selection(best=2))
