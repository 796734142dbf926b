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
    assert "n_averaged" not in [k.key for k in info.keys]
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


def build():
    """A user's factory: the network an AveragedModel wraps (its weights under `module.`)."""
    return _net(0)


def data(split="train"):
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.randn(40, 4, generator=g),
                                          torch.arange(40) % 2)


def test_bn_fix_of_an_averaged_model_loads_back_into_averaged_model(tmp_path):
    """Issue #35: the output of bn-fix is keyed as its input was: an AveragedModel's
    state dict keeps `module.` and its n_averaged, so AveragedModel.load_state_dict takes it
    (strict), with the statistics of torch's update_bn on the same images; in place too."""
    from torch.optim.swa_utils import update_bn

    from tests.interop.conftest import cli_ok

    nets = [_net(i) for i in range(3)]
    swa = AveragedModel(nets[0])
    for n in nets:
        swa.update_parameters(n)
    path = tmp_path / "swa.pt"
    torch.save(swa.state_dict(), path)
    here = "tests.interop.test_swa_utils"
    cli_ok("bn-fix", path, "--model", f"{here}:build", "--data", f"{here}:data",
           "--batch-size", "64", "-o", tmp_path / "fixed.pt")
    update_bn(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data().tensors[0]),
                                          batch_size=64), swa)
    for out in (tmp_path / "fixed.pt", path):
        if out == path:  # in place: nothing else in the file to lose
            cli_ok("bn-fix", path, "--model", f"{here}:build", "--data", f"{here}:data",
                   "--batch-size", "64")
        got = AveragedModel(_net(7))
        got.load_state_dict(torch.load(out, weights_only=True), strict=True)
        assert int(got.n_averaged) == 3
        want = swa.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
