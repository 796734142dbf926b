import copy
import json
import os

import pytest
import torch
from torch.optim.swa_utils import update_bn

import ckptavg
from ckptavg.errors import CkptavgError, ModelError, OptionError
from ckptavg.nn.bn import recalibrate
from ckptavg.options import DataOptions, LoaderOptions, ModelOptions
from tests.fakedata import tiny_bn, write_cifar10, write_mnist, zero_linear


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 5), torch.nn.BatchNorm1d(5, momentum=0.3))


def _loader(n=40, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 1, 8, 8, generator=g) * 2 + 1
    ys = torch.arange(n) % 5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=bs)


def test_same_result_as_torch_update_bn():
    a, b = _net(), _net()
    a.eval(), b.eval()
    loader = _loader(n=44)  # a short last batch: per-batch averaging shows
    update_bn(loader, a)
    info = recalibrate(b, loader)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert (info.bn_layers, info.batches, info.samples) == (2, 6, 44)
    assert not b.training and b[5].momentum == 0.3  # modes and momenta restored


def test_exact_stats_are_population_statistics():
    net = _net()
    loader = _loader(n=40, bs=8)
    recalibrate(net, loader, stats="exact")
    xs = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        first = net[0](xs).double()  # the first BN's input does not depend on BN statistics
    mean = first.mean(dim=(0, 2, 3))
    var = first.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(net[1].running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net[1].running_var.double(), var, rtol=1e-6, atol=1e-6)
    ref = copy.deepcopy(_net())
    update_bn(loader, ref)  # equal batches: the same mean ...
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=1e-5, atol=1e-6)
    # ... and the pooled variance adds the spread between batch means to the within-batch
    # variance that update_bn averages: (N-1) v = sum (n_b-1) v_b + sum n_b (m_b - m)^2
    n_b = 8 * 36
    batch_means = first.view(5, 8, 3, 36).transpose(1, 2).reshape(5, 3, -1).mean(-1)
    between = (n_b * (batch_means - mean) ** 2).sum(0)
    within = 5 * (n_b - 1) * ref[1].running_var.double()
    torch.testing.assert_close(net[1].running_var.double() * (40 * 36 - 1), within + between,
                               rtol=1e-5, atol=1e-5)


def test_max_batches_and_no_bn():
    net = _net()
    assert recalibrate(net, _loader(), max_batches=2).samples == 16
    lin = torch.nn.Linear(3, 3)
    assert recalibrate(lin, _loader()).bn_layers == 0
    with pytest.raises(CkptavgError, match="stats 'nope': use one of update_bn, exact"):
        recalibrate(net, _loader(), stats="nope")


def test_dict_batches():
    net, ref = _net(), _net()
    loader = _loader()
    update_bn(loader, ref)
    dicts = [{"pixels": x, "label": y} for x, y in loader]
    recalibrate(net, dicts, input_key="pixels")
    assert torch.equal(net[1].running_var, ref[1].running_var)


@pytest.fixture
def stale_ckpt(tmp_path):
    write_mnist(str(tmp_path / "data"), n_train=64, n_test=30)
    torch.manual_seed(0)
    net = tiny_bn(10, 1)
    path = tmp_path / "swa.safetensors"
    ckptavg.save(net.state_dict(), path, {"model.arch": "tiny_bn",
                                           "model.kwargs": json.dumps({"num_classes": 10}),
                                           "data.name": "fashion-mnist", "bn.stale": "true",
                                           "average.n": "3"})
    return path, str(tmp_path / "data")


def test_bn_fix_checkpoint_end_to_end(stale_ckpt, tmp_path):
    path, data_dir = stale_ckpt
    out = tmp_path / "fixed.safetensors"
    res = ckptavg.bn_fix(path, out, augment=False, data=DataOptions(data_dir=data_dir), loader=LoaderOptions(batch_size=16))
    assert res.bn_layers == 1 and res.samples == 64 and res.batches == 4
    state, meta = ckptavg.load(out)
    assert meta["bn.stale"] == "false" and meta["bn.samples"] == "64"
    assert meta["bn.data"] == "fashion-mnist:train" and meta["average.n"] == "3"
    # The same as update_bn on the rebuilt model and the pass's order: the images shuffled by
    # torch.randperm with the seed (0), in batches of 16.
    from ckptavg.nn.data import get_dataset

    net = tiny_bn(10, 1)
    net.load_state_dict(ckptavg.load(path)[0])
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    ds = torch.utils.data.Subset(get_dataset("fashion-mnist", "train", data_dir), order)
    update_bn(torch.utils.data.DataLoader(ds, batch_size=16), net)
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v), k


def test_bn_fix_in_place_fraction_and_subset(stale_ckpt):
    path, data_dir = stale_ckpt
    res = ckptavg.bn_fix(path, fraction=0.5, data=DataOptions(data_dir=data_dir), loader=LoaderOptions(batch_size=16))
    assert res.output == str(path) and res.batches == 2
    res = ckptavg.bn_fix(path, bn_images=40, augment=False, data=DataOptions(data_dir=data_dir), loader=LoaderOptions(batch_size=16))
    assert res.samples == 40 and ckptavg.load(path)[1]["bn.data"] == "fashion-mnist:train:first40"
    assert ckptavg.load(path)[1]["bn.stale"] == "false"
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")] == []


def test_bn_fix_without_model_metadata_says_what_to_pass(tmp_path):
    p = tmp_path / "x.safetensors"
    ckptavg.save({"w": torch.ones(1)}, p, {"data.name": "fashion-mnist"})
    with pytest.raises(OptionError, match="model: missing: .* has no model.arch metadata"):
        ckptavg.bn_fix(p)


def test_bn_fix_wrong_model_names_the_keys(stale_ckpt):
    path, data_dir = stale_ckpt
    with pytest.raises(ModelError, match="weights do not fit the model: missing"):
        ckptavg.bn_fix(path, data=DataOptions(data_dir=data_dir), model="convnet_bn")


def test_evaluate_known_accuracy_and_loss(tmp_path):
    write_mnist(str(tmp_path), n_test=30)
    p = tmp_path / "z.safetensors"
    ckptavg.save(zero_linear().state_dict(), p, {"model.arch": "zero_linear",
                                                 "data.name": "fashion-mnist"})
    res = ckptavg.evaluate(p, data=DataOptions(data_dir=str(tmp_path)))
    assert res.samples == 30 and res.accuracy == pytest.approx(10.0)  # labels i % 10
    assert res.loss == pytest.approx(torch.log(torch.tensor(10.0)).item(), rel=1e-6)
    assert res.bn_stale is False


def test_bn_fix_batches_and_fraction_together_are_refused(stale_ckpt):
    path, data_dir = stale_ckpt
    before = open(path, "rb").read()
    with pytest.raises(CkptavgError, match="batches / fraction: give one, not both"):
        ckptavg.bn_fix(path, batches=5, fraction=0.1, data=DataOptions(data_dir=data_dir))
    assert open(path, "rb").read() == before


def test_bn_fix_uses_the_images_the_run_trained_on(stale_ckpt):
    """`train --train-images 40 --holdout 8` trains on the first 32 images and records it."""
    path, data_dir = stale_ckpt
    state, meta = ckptavg.load(path)
    ckptavg.save(state, path, {**meta, "data.train_images": "32"})
    res = ckptavg.bn_fix(path, data=DataOptions(data_dir=data_dir), loader=LoaderOptions(batch_size=16))
    assert res.samples == 32
    assert ckptavg.load(path)[1]["bn.data"] == "fashion-mnist:train:first32:augment"
    # Another data set than the run's: the record says nothing about it.
    write_mnist(str(os.path.dirname(path)) + "/mnist", n_train=48, n_test=8)
    res = ckptavg.bn_fix(path, data=DataOptions(data="mnist", data_dir=str(os.path.dirname(path)) + "/mnist"), loader=LoaderOptions(batch_size=16))
    assert res.samples == 48


def test_bn_fix_of_a_model_without_batchnorm_clears_a_stale_flag(tmp_path):
    write_mnist(str(tmp_path / "data"), n_train=16, n_test=8)
    p = tmp_path / "lin.safetensors"
    ckptavg.save(zero_linear().state_dict(), p, {"model.arch": "zero_linear",
                                                 "data.name": "fashion-mnist", "bn.stale": "true"})
    res = ckptavg.bn_fix(p, data=DataOptions(data_dir=str(tmp_path / "data")))
    assert res.bn_layers == 0 and "no BatchNorm" in res.message
    assert ckptavg.load(p)[1]["bn.stale"] == "false"
    r = ckptavg.evaluate(p, data=DataOptions(data_dir=str(tmp_path / "data")))
    assert r.bn_stale is False and r.warnings == []


def test_eval_warns_about_another_data_set_and_refuses_wrong_channels(stale_ckpt, tmp_path):
    path, data_dir = stale_ckpt
    r = ckptavg.evaluate(path, data=DataOptions(data="mnist", data_dir=data_dir))
    assert any("trained on fashion-mnist" in w and "mnist" in w for w in r.warnings)
    write_cifar10(str(tmp_path / "c10"), per_batch=4, n_test=4)
    with pytest.raises(CkptavgError, match="takes 1-channel images but cifar10 has 3-channel"):
        ckptavg.evaluate(path, data=DataOptions(data="cifar10", data_dir=str(tmp_path / "c10")), model=ModelOptions(model_kwargs={"in_channels": 1}))
