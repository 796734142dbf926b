import csv
import json
import os

import pytest
import torch

import ckptavg
from ckptavg.errors import CkptavgError
from ckptavg.experiments.ensemble import ensemble
from ckptavg.experiments.replicate import replicate
from ckptavg.experiments.width import width
from ckptavg.options import DataOptions, LoaderOptions
from tests.fakedata import tiny_bn, write_cifar10, write_mnist

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # Fashion-MNIST's normalisation, written out


@pytest.fixture
def two(tmp_path):
    arrays = write_mnist(str(tmp_path / "data"), n_train=40, n_test=20)
    paths, nets = [], []
    for i in range(2):
        torch.manual_seed(i)
        net = tiny_bn()
        with torch.no_grad():  # statistics other than the defaults, so eval mode matters
            net[1].running_mean.uniform_(-0.5, 0.5)
            net[1].running_var.uniform_(0.5, 2)
        p = tmp_path / f"m{i}.safetensors"
        ckptavg.save(net.state_dict(), p, {"model.arch": "tiny_bn", "data.name": "fashion-mnist"})
        paths.append(str(p))
        nets.append(net.eval())
    images, labels = arrays["test"]
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - FMNIST_MEAN) / FMNIST_STD
    return paths, str(tmp_path / "data"), nets, x, torch.from_numpy(labels).long()


def test_ensemble_is_the_mean_of_softmax(two):
    """Reference: the networks as built in the test, the test images decoded by numpy."""
    paths, data, nets, x, y = two
    res = ensemble(paths, data=DataOptions(data_dir=data))
    with torch.no_grad():
        probs = [torch.softmax(n(x).double(), 1) for n in nets]
    mean = (probs[0] + probs[1]) / 2
    acc = (mean.argmax(1) == y).double().mean().item() * 100
    nll = -mean.gather(1, y.view(-1, 1)).log().mean().item()
    assert res.n == 2 and res.samples == 20 and res.accuracy == pytest.approx(acc)
    assert res.loss == pytest.approx(nll, rel=1e-5)
    for m, p in zip(res.members, probs):
        assert m.accuracy == pytest.approx((p.argmax(1) == y).double().mean().item() * 100)
    member_loss = [-p.gather(1, y.view(-1, 1)).log().mean().item() for p in probs]
    assert res.loss < max(member_loss) or res.loss == pytest.approx(max(member_loss))


def _test_error_at(net, direction, t, x, y):
    """The test error (%) of `net` moved by t along `direction` (unit length over all
    parameters), computed here on a copy of the network built by the test."""
    import copy

    norm = sum(float((v.double() ** 2).sum()) for v in direction.values()) ** 0.5
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_((t * direction[n].double() / norm).float())
        return 100 - (moved(x).argmax(1) == y).double().mean().item() * 100


def test_width_every_point_is_the_test_error_of_the_moved_network(two, tmp_path):
    """Reference: directions drawn in the test, every point's test error computed in the
    test from the networks it built; the CSV, the rows and the summary must all agree."""
    paths, data, nets, x, y = two
    g = torch.Generator().manual_seed(11)
    dirs = [{n: torch.randn(p.shape, generator=g) for n, p in nets[0].named_parameters()}
            for _ in range(3)]
    png, csv_path = str(tmp_path / "w.png"), str(tmp_path / "w.csv")
    res = width(*paths, points=3, max_distance=5, labels=("SGD", "SWA"), bn_fix=False,
                directions=dirs, csv_path=csv_path, plot_path=png, data=DataOptions(data_dir=data))
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 * 2 * 3 and {r["solution"] for r in rows} == {"SGD", "SWA"}
    for r in rows:
        net = nets[0 if r["solution"] == "SGD" else 1]
        want = _test_error_at(net, dirs[int(r["ray"])], float(r["distance"]), x, y)
        assert float(r["test_error"]) == pytest.approx(want, abs=1e-9), r
    for s, net in zip(res.summary, nets):
        far = sorted(_test_error_at(net, d, 5.0, x, y) for d in dirs)
        assert s.centre_test_error == pytest.approx(_test_error_at(net, dirs[0], 0.0, x, y))
        assert s.median_test_error_at_max == pytest.approx(far[1])
    assert os.path.getsize(png) > 1000 and res.labels == ["SGD", "SWA"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_width_summary_with_a_distance_that_is_not_exact_in_floats(two, tmp_path):
    """0.1 * 3 / 3 != 0.1 in floats: the summary still takes the far points (the median
    over the one ray is that ray's test error at 0.1, computed here)."""
    paths, data, nets, x, y = two
    d = {n: torch.ones(p.shape) for n, p in nets[0].named_parameters()}
    res = width(*paths, points=4, max_distance=0.1, bn_fix=False, directions=[d],
                data=DataOptions(data_dir=data))
    assert res.max_distance == 0.1
    for s, net in zip(res.summary, nets):
        assert s.median_test_error_at_max == pytest.approx(_test_error_at(net, d, 0.1, x, y))


def test_width_directions_are_unit_and_shared():
    from ckptavg.experiments.width import _direction

    net = tiny_bn()
    d1, d2 = _direction(net, 7), _direction(net, 7)
    norm = sum(float((v.double() ** 2).sum()) for v in d1.values()) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-6)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_replicate_cifar_preset_code_path_at_tiny_scale(tmp_path):
    write_cifar10(str(tmp_path / "data"), per_batch=8, n_test=10)
    out = tmp_path / "rep"
    res = replicate("cifar10-preresnet164", str(out), seeds=2, data_dir=str(tmp_path / "data"),
                    device="cpu", overrides={"budget": 4, "swa_start": 2, "batch_size": 16,
                                             "model": "tests.fakedata:tiny_bn"})
    assert set(res.summary) == {"sgd", "swa_1", "swa_1.25", "swa_1.5", "ensemble_1",
                                "ensemble_1.25", "ensemble_1.5"}
    assert res.paper["swa_1.5"] == 95.83
    saved = json.load(open(out / "results.json"))
    assert len(saved["per_seed"]) == 2 and saved["per_seed"][1]["seed"] == 1
    assert saved["config"]["model_kwargs"] == {}
    seed0 = saved["per_seed"][0]
    assert [c["epoch"] for c in seed0["swa_curve"]] == [2, 3, 4, 5, 6]
    # Budgets 1, 1.25, 1.5 x 4 end at epochs 4, 5, 6; each row is the independent
    # evaluation of the running average folded up to that epoch, here redone from the
    # run's checkpoints with a float64 mean computed in the test.
    ckpts = [ckptavg.load(out / "seed-0" / "swa" / f"epoch-{e:04d}.safetensors")[0]
             for e in range(2, 6)]
    mean = {k: torch.stack([c[k].double() for c in ckpts]).mean(0) for k in ckpts[0]
            if ckpts[0][k].is_floating_point()}
    ref = tmp_path / "ref.safetensors"
    ckptavg.save({k: (mean[k].float() if k in mean else ckpts[-1][k]) for k in ckpts[0]}, ref,
                 {"model.arch": "tests.fakedata:tiny_bn", "data.name": "cifar10",
                  "data.train_images": "40"})
    ckptavg.bn_fix(ref, seed=0, model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=str(tmp_path / "data")), loader=LoaderOptions(device="cpu"))
    r = ckptavg.evaluate(ref, model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=str(tmp_path / "data")), loader=LoaderOptions(device="cpu"))
    assert seed0["swa_1.25"] == pytest.approx(r.accuracy)
    table = open(out / "results.md").read()
    assert "| SWA 1.5 budgets |" in table and "95.83" in table
    assert os.path.getsize(out / "curves.png") > 1000
    meta = ckptavg.load(out / "seed-0" / "swa-running.safetensors")[1]
    assert meta["average.n"] == "5"  # epochs 2..6 folded one by one with --into


def test_replicate_seeds_in_parallel_jobs_equal_one_after_the_other(tmp_path):
    """Given seeds, 2 spawned jobs of 1 thread give every number a sequential run gives."""
    write_cifar10(str(tmp_path / "data"), per_batch=8, n_test=10)
    over = {"budget": 4, "swa_start": 2, "batch_size": 16, "model": "tests.fakedata:tiny_bn",
            "threads": 1}
    a = replicate("cifar10-vgg16", str(tmp_path / "a"), seeds=[5, 3], data_dir=str(tmp_path / "data"),
                  device="cpu", overrides=over)
    b = replicate("cifar10-vgg16", str(tmp_path / "b"), seeds=[5, 3], data_dir=str(tmp_path / "data"),
                  device="cpu", overrides=over, jobs=2)
    assert a.seeds == b.seeds == [5, 3] and a.threads == 1
    for sa, sb in zip(a.per_seed, b.per_seed):
        assert {k: v for k, v in sa.items() if k != "train_seconds"} == \
            {k: v for k, v in sb.items() if k != "train_seconds"}
    meta = ckptavg.load(tmp_path / "b" / "seed-3" / "swa" / "epoch-0002.safetensors")[1]
    assert meta["train.threads"] == "1" and meta["train.seed"] == "3"


def test_unknown_preset():
    from ckptavg.errors import CkptavgError

    with pytest.raises(CkptavgError, match="did you mean cifar10-vgg16"):
        replicate("cifar10-vgg61", "/nonexistent")


def test_budget_rows_are_different_epochs():
    from ckptavg.errors import CkptavgError
    from ckptavg.experiments.replicate import budget_epochs

    assert budget_epochs(3) == {1.0: 3, 1.25: 4, 1.5: 5}  # 4.5 rounds up, not to even
    assert budget_epochs(20) == {1.0: 20, 1.25: 25, 1.5: 30}
    with pytest.raises(CkptavgError, match="not three different epochs"):
        replicate("fashion-mnist", "/nonexistent", overrides={"budget": 2, "swa_start": 1})


def test_beyond_on_tiny_replicate_runs(tmp_path):
    """Soups, search and SWAG on replicate's runs: every row present, the SGD row equal to an
    independent `evaluate` of the SGD run's last weights, and the per-seed result reused."""
    from ckptavg.experiments.beyond import ROWS, beyond

    write_cifar10(str(tmp_path / "data"), per_batch=10, n_test=10)
    out = tmp_path / "rep"
    data = str(tmp_path / "data")
    over = {"budget": 4, "swa_start": 2, "batch_size": 16, "model": "tests.fakedata:tiny_bn",
            "subset": 50, "holdout": 10, "threads": 1}
    replicate("cifar10-vgg16", str(out), seeds=[0], data_dir=data, device="cpu", overrides=over)
    with pytest.raises(CkptavgError, match="run ckptavg replicate"):
        beyond(str(tmp_path / "nothing"), data_dir=data)
    r = beyond(str(out), data_dir=data, device="cpu", samples=2)
    assert set(r.selection) == set(ROWS) and r.seeds == [0]
    seed = r.per_seed[0]
    sgd = ckptavg.evaluate(out / "seed-0" / "sgd" / "epoch-0004.safetensors", model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=data), loader=LoaderOptions(device="cpu"))
    assert seed["sgd"]["test"] == pytest.approx(sgd.accuracy)
    assert [w["start_epoch"] for w in seed["windows"]] == [1, 2, 3, 4, 5, 6]
    assert set(seed["calibration"]) == {"sgd", "swa", "swag_diag", "swag"}
    assert os.path.exists(out / "beyond.md") and os.path.exists(out / "search-seed0.png")
    assert os.path.exists(out / "reliability-seed0.png")
    again = beyond(str(out), data_dir=data, device="cpu", samples=2)  # from seed-0/beyond.json
    assert again.per_seed == json.loads(json.dumps(r.per_seed))
