"""torch.optim.swa_utils.AveragedModel: its state dicts read, its n_averaged honoured."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import ckptavg
from tests.interop.conftest import assert_matches, float64_mean


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def test_averaged_model_state_dict_is_read_as_the_inner_network(tmp_path):
    nets = [_net(i) for i in range(3)]
    swa = AveragedModel(nets[0])
    for n in nets:
        swa.update_parameters(n)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    info = ckptavg.inspect(tmp_path / "swa.pt")
    assert info.removed_prefixes == ["module."] and info.metadata["swa.n_averaged"] == "3"
    assert "n_averaged" not in [k["key"] for k in info.keys]
    # the inner network loads it strictly
    state, _ = ckptavg.load(tmp_path / "swa.pt")
    fresh = _net(9)
    fresh.load_state_dict(state, strict=True)


def test_into_an_averaged_model_uses_its_count(tmp_path):
    nets = [_net(i) for i in range(4)]
    swa = AveragedModel(nets[0])
    for n in nets[:3]:
        swa.update_parameters(n)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    torch.save(nets[3].state_dict(), tmp_path / "epoch-4.pt")
    r = ckptavg.average([tmp_path / "epoch-4.pt"], tmp_path / "out.safetensors",
                        into=tmp_path / "swa.pt")
    assert r.n == 4 and r.weights == [0.75, 0.25]
    got, meta = ckptavg.load(tmp_path / "out.safetensors")
    want = float64_mean([n.state_dict() for n in nets])
    params = {k for k, _ in nets[0].named_parameters()}
    assert_matches({k: got[k] for k in params}, {k: want[k] for k in params}, atol=1e-6)
    assert meta["average.n"] == "4"
