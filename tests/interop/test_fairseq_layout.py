"""fairseq's checkpoint layout, written here as fairseq's checkpoint_utils writes it (fairseq
itself is not installed): weights under `model`, configuration under `cfg`, the epoch in the
iterator state, the update count in the optimizer history."""

from __future__ import annotations

import torch

import ckptavg
from ckptavg.options import Selection
from tests.interop.conftest import assert_matches, float64_mean


def _save(path, epoch, updates, seed):
    g = torch.Generator().manual_seed(seed)
    model = {"encoder.embed_tokens.weight": torch.randn(10, 4, generator=g),
             "decoder.output_projection.weight": torch.randn(10, 4, generator=g)}
    torch.save({"model": model, "cfg": {"model": {"arch": "transformer"}, "task": {"data": "x"}},
                "args": None,
                "optimizer_history": [{"criterion_name": "CE", "num_updates": updates}],
                "extra_state": {"train_iterator": {"epoch": epoch}, "best": 1.5},
                "last_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}}}, path)
    return model


def test_fairseq_checkpoints_round_trip(tmp_path):
    states = [_save(tmp_path / f"checkpoint{e}.pt", e, 100 * e, e) for e in (1, 2, 3)]
    paths = [tmp_path / f"checkpoint{e}.pt" for e in (1, 2, 3)]
    plan = ckptavg.average(paths, dry_run=True)
    assert plan.epochs == [1, 2, 3] and plan.steps == [100, 200, 300]
    assert plan.epoch_sources[0] == "checkpoint entry 'extra_state/train_iterator/epoch'"
    out = tmp_path / "avg.pt"
    ckptavg.average(paths, out, selection=Selection(from_epoch=2))
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"model", "cfg", "args", "metadata"}  # no optimizer, no iterator state
    assert obj["cfg"] == {"model": {"arch": "transformer"}, "task": {"data": "x"}}
    assert_matches(obj["model"], float64_mean(states[1:]))
