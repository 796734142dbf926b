import csv
import json
import os

import pytest
import torch

import ckptavg
from ckptavg.experiments.ensemble import ensemble
from ckptavg.experiments.replicate import replicate
from ckptavg.experiments.width import width
from tests.fakedata import tiny_bn, write_cifar10, write_mnist


@pytest.fixture
def two(tmp_path):
    write_mnist(str(tmp_path / "data"), n_train=40, n_test=20)
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        p = tmp_path / f"m{i}.safetensors"
        ckptavg.save(tiny_bn().state_dict(), p, {"model.arch": "tiny_bn",
                                                 "data.name": "fashion-mnist"})
        paths.append(str(p))
    return paths, str(tmp_path / "data")


def test_ensemble_is_the_mean_of_softmax(two):
    paths, data = two
    res = ensemble(paths, data_dir=data)
    from ckptavg.data import get_dataset, make_loader
    from ckptavg.evaluation import predict, scores
    from ckptavg.modelio import build_from_checkpoint

    loader = make_loader(get_dataset("fashion-mnist", "test", data), 256)
    probs = [predict(build_from_checkpoint(p, data_dir=data)[0], loader)[0] for p in paths]
    y = predict(build_from_checkpoint(paths[0], data_dir=data)[0], loader)[1]
    expected = scores((probs[0].double() + probs[1]) .div(2).float(), y)
    assert res["accuracy"] == expected["accuracy"] and res["n"] == 2
    assert res["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert [m["accuracy"] for m in res["members"]] == [scores(p, y)["accuracy"] for p in probs]


def test_width_rows_csv_and_plot(two, tmp_path):
    paths, data = two
    png, csv_path = str(tmp_path / "w.png"), str(tmp_path / "w.csv")
    res = width(*paths, data_dir=data, rays=2, points=3, max_distance=5, labels=("SGD", "SWA"),
                csv_path=csv_path, plot_path=png)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2 * 2 * 3
    assert {r["solution"] for r in rows} == {"SGD", "SWA"}
    centre = [r for r in rows if float(r["distance"]) == 0 and r["solution"] == "SGD"]
    assert centre[0]["test_error"] == centre[1]["test_error"]  # the same point on every ray
    assert os.path.getsize(png) > 1000 and res["labels"] == ["SGD", "SWA"]


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
    assert set(res["summary"]) == {"sgd", "swa_1", "swa_1.25", "swa_1.5", "ensemble_1",
                                   "ensemble_1.25", "ensemble_1.5"}
    assert res["paper"]["swa_1.5"] == 95.83
    saved = json.load(open(out / "results.json"))
    assert len(saved["per_seed"]) == 2 and saved["per_seed"][1]["seed"] == 1
    seed0 = saved["per_seed"][0]
    assert [c["epoch"] for c in seed0["swa_curve"]] == [2, 3, 4, 5, 6]
    assert seed0["swa_1.5"] == seed0["swa_curve"][-1]["accuracy"]
    table = open(out / "results.md").read()
    assert "| SWA 1.5 budgets |" in table and "95.83" in table
    assert os.path.getsize(out / "curves.png") > 1000
    meta = ckptavg.load(out / "seed-0" / "swa-running.safetensors")[1]
    assert meta["average.n"] == "5"  # epochs 2..6 folded one by one with --into


def test_unknown_preset():
    from ckptavg.errors import CkptavgError

    with pytest.raises(CkptavgError, match="did you mean cifar10-vgg16"):
        replicate("cifar10-vgg61", "/nonexistent")
