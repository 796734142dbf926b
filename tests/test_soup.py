"""Greedy/uniform soups and the SWA window search, on models whose answer is known by
construction: linear classifiers of 2-D points whose boundary is rotated by a known angle.

Expected values are computed here with float64 arithmetic on the points, never with
ckptavg's own scoring."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import ckptavg
from ckptavg.cli import cli
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.options import DataOptions, HeldOutOptions, LoaderOptions, Selection
from ckptavg.selection.heldout import RunningSum
from tests.fakedata import Blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "tests.fakedata:blobs_no_test"  # reading its test split raises
MODEL = "tests.fakedata:linear2"
HELD = slice(400, 600)  # holdout=200 of 600 training points


def rotated(deg: float, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A classifier whose boundary normal is (cos, sin) of `deg`: 0 degrees is exact."""
    a = math.radians(deg)
    n = torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64) * scale
    return {"weight": torch.stack([-n, n]).float(), "bias": torch.zeros(2)}


def accuracy(state: dict[str, torch.Tensor], points: slice = HELD, train: bool = True) -> float:
    """Accuracy (%) of a linear classifier on the blobs, in float64, by hand."""
    ds = Blobs(600, 0) if train else Blobs(200, 1)
    x, y = ds.x[points].double(), ds.y[points]
    logits = x @ state["weight"].double().T + state["bias"].double()
    return float((logits.argmax(1) == y).double().mean() * 100)


def loss(state: dict[str, torch.Tensor], points: slice = HELD) -> float:
    """Mean cross-entropy of the same classifier, in float64, by hand."""
    ds = Blobs(600, 0)
    x, y = ds.x[points].double(), ds.y[points]
    logits = x @ state["weight"].double().T + state["bias"].double()
    picked = logits.gather(1, y.view(-1, 1)).squeeze(1)
    return float((torch.logsumexp(logits, 1) - picked).mean())


def mean64(states: list[dict]) -> dict[str, torch.Tensor]:
    return {k: (sum(s[k].double() for s in states) / len(states)).float() for k in states[0]}


def write(tmp_path, states: dict[str, dict], meta: dict | None = None) -> list[str]:
    paths = []
    for i, (name, st) in enumerate(states.items()):
        p = str(tmp_path / f"{name}.safetensors")
        ckptavg.save(st, p, {"model.arch": MODEL, "train.epoch": str(i + 1), **(meta or {})})
        paths.append(p)
    return paths


def test_greedy_soup_accepts_what_helps_and_rejects_what_does_not(tmp_path):
    # a and b are each about 83 % right; their mean is the exact boundary (100 %); c alone
    # is 0 % and adding it to {a, b} keeps the boundary (no strict gain): rejected.
    states = {"a": rotated(30), "b": rotated(-30), "c": rotated(180)}
    paths = write(tmp_path, states)
    out = tmp_path / "soup.safetensors"
    r = ckptavg.soup(paths, out, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert r.method == "greedy"
    assert sorted(r.chosen) == sorted(paths[:2])
    by_path = {g.path: g for g in r.ingredients}
    assert not by_path[paths[2]].accepted and by_path[paths[0]].accepted
    for p, st in zip(paths, states.values()):
        assert by_path[p].holdout_accuracy == pytest.approx(accuracy(st))
    assert [g.path for g in r.ingredients][-1] == paths[2]  # worst last
    assert r.holdout_accuracy == pytest.approx(accuracy(mean64([states["a"], states["b"]])))
    assert r.holdout_accuracy == 100.0
    saved, meta = ckptavg.load(out)
    expect = mean64([states["a"], states["b"]])
    for k in expect:
        assert torch.equal(saved[k], expect[k]), k
    assert meta["average.n"] == "2"
    assert meta["select.method"] == "greedy-soup"
    assert meta["select.holdout"] == f"{DATA}:train[400:600]"
    assert [e["file"] for e in json.loads(meta["average.inputs"])] == ["a.safetensors",
                                                                       "b.safetensors"]
    assert r.test_accuracy is None  # and blobs_no_test was never asked for its test split


def test_a_soup_that_would_lose_keeps_the_best_single(tmp_path):
    # b and c each pull the exact a off its boundary: a stays alone.
    states = {"a": rotated(0), "b": rotated(60), "c": rotated(-80, 3.0)}
    paths = write(tmp_path, states)
    r = ckptavg.soup(paths, tmp_path / "s.safetensors", heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert r.chosen == [paths[0]]
    saved, _ = ckptavg.load(tmp_path / "s.safetensors")
    assert torch.equal(saved["weight"], states["a"]["weight"])


def test_uniform_soup_is_the_float64_mean_of_all(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = {n: {"weight": torch.randn(2, 2, generator=g), "bias": torch.randn(2, generator=g)}
              for n in "abcd"}
    paths = write(tmp_path, states)
    r = ckptavg.soup(paths, tmp_path / "u.safetensors", uniform=True, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert r.chosen == paths and all(g.accepted for g in r.ingredients)
    expect = mean64(list(states.values()))
    saved, meta = ckptavg.load(tmp_path / "u.safetensors")
    assert all(torch.equal(saved[k], expect[k]) for k in expect)
    assert r.holdout_accuracy == pytest.approx(accuracy(expect))
    assert meta["select.method"] == "uniform-soup"


def test_only_the_final_choice_reads_the_test_split(tmp_path):
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30)})
    # Selection alone never asks the data function for its test split (it would raise) ...
    ckptavg.search(paths, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    ckptavg.soup(paths, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    # ... and asking for the test score reads it, after the choice.
    with pytest.raises(AssertionError, match="test split was read"):
        ckptavg.soup(paths, test=True, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    r = ckptavg.soup(paths, test=True, heldout=HeldOutOptions(holdout=200), data="tests.fakedata:blobs", model=MODEL, loader=LoaderOptions(device="cpu"))
    expect = mean64([rotated(30), rotated(-30)])
    assert r.test_accuracy == pytest.approx(accuracy(expect, slice(None), train=False))


def test_search_scores_every_window_and_writes_the_best(tmp_path):
    # Epochs 1..5; the windows that start at epoch 2 or 4 average to the exact boundary.
    degs = [170, 40, -40, 20, -20]
    states = {f"epoch-{i + 1:04d}": rotated(d) for i, d in enumerate(degs)}
    paths = write(tmp_path, states)
    out, png = tmp_path / "best.safetensors", tmp_path / "search.png"
    r = ckptavg.search(paths, out, plot=png, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    seq = list(states.values())
    assert [w.start_epoch for w in r.windows] == [1, 2, 3, 4, 5]
    assert [w.n for w in r.windows] == [5, 4, 3, 2, 1]
    for i, w in enumerate(r.windows):
        assert w.holdout_accuracy == pytest.approx(accuracy(mean64(seq[i:]))), i
        assert w.holdout_loss == pytest.approx(loss(mean64(seq[i:])), rel=1e-5), i
    # Epochs 2 and 4 both give 100 %: the lower held-out loss decides (epoch 4's mean has
    # the longer normal vector, so more confident correct answers).
    best = max(range(5), key=lambda i: (accuracy(mean64(seq[i:])), -loss(mean64(seq[i:]))))
    assert best == 3
    assert r.best.start_epoch == best + 1
    # The written window equals `average` over the same files, bit for bit.
    ckptavg.average(paths[best:], tmp_path / "engine.safetensors")
    saved, meta = ckptavg.load(out)
    engine, _ = ckptavg.load(tmp_path / "engine.safetensors")
    assert all(torch.equal(saved[k], engine[k]) for k in engine)
    assert meta["select.method"] == "window-search"
    assert meta["select.start_epoch"] == str(best + 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_reads_each_checkpoint_once(tmp_path, monkeypatch):
    paths = write(tmp_path, {f"e{i}": rotated(10 * i) for i in range(6)})
    reads = []
    original = RunningSum.read
    monkeypatch.setattr(RunningSum, "read", staticmethod(lambda r: reads.append(r.path)
                                                         or original(r)))
    r = ckptavg.search(paths, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert len(r.windows) == 6
    assert sorted(reads) == sorted(paths)


def test_search_sweep_scores_sliding_windows_reading_each_once(tmp_path, monkeypatch):
    # Windows of 2 along 6 epochs: only epochs 3+4 (+25, -25 degrees) average to the exact
    # boundary with the longest normal; the others lean.
    degs = [90, 60, 25, -25, 70, 80]
    states = {f"epoch-{i + 1:04d}": rotated(d) for i, d in enumerate(degs)}
    paths = write(tmp_path, states)
    reads = []
    original = RunningSum.read
    monkeypatch.setattr(RunningSum, "read", staticmethod(lambda r: reads.append(r.path)
                                                         or original(r)))
    out, png = tmp_path / "best.safetensors", tmp_path / "curve.png"
    r = ckptavg.search(paths, out, plot=png, sweep="window=2",
                       heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL,
                       loader=LoaderOptions(device="cpu"))
    assert sorted(reads) == sorted(paths)  # each input read once
    seq = list(states.values())
    assert [(w.start_epoch, w.end_epoch, w.n) for w in r.windows] == [
        (i + 1, i + 2, 2) for i in range(5)]
    for i, w in enumerate(r.windows):
        assert w.holdout_accuracy == pytest.approx(accuracy(mean64(seq[i:i + 2]))), i
        assert w.holdout_loss == pytest.approx(loss(mean64(seq[i:i + 2])), rel=1e-5), i
    best = max(range(5), key=lambda i: (accuracy(mean64(seq[i:i + 2])),
                                        -loss(mean64(seq[i:i + 2])), i))
    assert (r.best.start_epoch, r.best.end_epoch) == (best + 1, best + 2)
    ckptavg.average(paths[best:best + 2], tmp_path / "engine.safetensors")
    saved, meta = ckptavg.load(out)
    engine, _ = ckptavg.load(tmp_path / "engine.safetensors")
    assert all(torch.equal(saved[k], engine[k]) for k in engine)
    assert meta["select.method"] == "window-sweep" and meta["select.sweep"] == "window=2"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(cli, ["search", *paths, "--sweep", "window=2", "--holdout", "200",
                                   "--data", DATA, "--model", MODEL, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"{best + 1}-{best + 2}" in res.output and "<- best" in res.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_running_sums_equal_one_shot_averages(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    states = [{"w": (torch.randn(1000, generator=g) * 3).to(dtype),
               "step": torch.tensor(i)} for i in range(7)]
    paths = []
    for i, st in enumerate(states):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        ckptavg.save(st, paths[-1])
    running = RunningSum()
    for i in reversed(range(7)):  # newest first, as the search builds its windows
        running.add(states[i], i)
        got = running.mean()
        ckptavg.average(paths[i:], tmp_path / "one.safetensors")
        ref, _ = ckptavg.load(tmp_path / "one.safetensors")
        assert got["w"].dtype == dtype
        assert torch.equal(got["w"], ref["w"]), i
        assert torch.equal(got["step"], ref["step"])  # the newest input's integer
        with_extra = RunningSum()
        for j in range(i + 1, 7):
            with_extra.add(states[j], j)
        if with_extra.n:
            assert torch.equal(with_extra.mean(extra=states[i], extra_order=i)["w"], ref["w"])


def test_batchnorm_is_recalibrated_on_the_training_part_before_scoring(tmp_path):
    g = torch.Generator().manual_seed(2)
    states = {}
    for n in "ab":
        net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))
        with torch.no_grad():
            net[1].weight.copy_(torch.randn(2, 2, generator=g))
            net[0].running_mean.fill_(50.0)  # stale statistics: must not survive
        states[n] = {k: v.clone() for k, v in net.state_dict().items()}
    paths = []
    for n, st in states.items():
        paths.append(str(tmp_path / f"{n}.safetensors"))
        ckptavg.save(st, paths[-1], {"model.arch": "tests.fakedata:bn2"})
    out = tmp_path / "u.safetensors"
    r = ckptavg.soup(paths, out, uniform=True, heldout=HeldOutOptions(holdout=200), data=DATA, model="tests.fakedata:bn2", loader=LoaderOptions(device="cpu", batch_size=1000))
    assert r.bn_recalibrated
    saved, meta = ckptavg.load(out)
    x = Blobs(600, 0).x[:400].double()  # the training part: one batch of all 400 points
    assert torch.allclose(saved["0.running_mean"].double(), x.mean(0), atol=1e-6)
    assert torch.allclose(saved["0.running_var"].double(), x.var(0, unbiased=True), atol=1e-6)
    expect = mean64(list(states.values()))
    assert torch.equal(saved["1.weight"], expect["1.weight"])
    assert meta["bn.stale"] == "false" and meta["bn.samples"] == "400"


def test_held_out_split_comes_from_the_runs_metadata_and_may_not_overlap_it(tmp_path):
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30)},
                  {"data.name": DATA, "data.train_images": "300", "data.holdout": "100"})
    r = ckptavg.soup(paths, data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert r.holdout == f"{DATA}:train[300:400]" and r.holdout_samples == 100
    assert r.ingredients[0].holdout_accuracy == pytest.approx(
        accuracy(rotated(30) if r.ingredients[0].path == paths[0] else rotated(-30),
                 slice(300, 400)))
    with pytest.raises(CkptavgError, match="include images the run trained on"):
        ckptavg.soup(paths, data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"), heldout=HeldOutOptions(holdout=100, train_images=350))
    (tmp_path / "bare").mkdir()
    bare = write(tmp_path / "bare", {"x": rotated(1), "y": rotated(2)})
    with pytest.raises(OptionError, match="holdout: missing: .* records no held-out images"):
        ckptavg.soup(bare, data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))


def test_an_output_that_is_an_input_is_refused_before_any_scoring(tmp_path):
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30)})
    before = open(paths[0], "rb").read()
    with pytest.raises(CkptavgError, match="is one of the inputs"):
        ckptavg.soup(paths, paths[0], heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    assert open(paths[0], "rb").read() == before


def test_cli_soup_json_and_search_table(tmp_path):
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30), "c": rotated(180)})
    res = CliRunner().invoke(cli, ["soup", *paths, "--holdout", "200", "--data", DATA,
                                   "--model", MODEL, "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["holdout_accuracy"] == 100.0 and len(out["chosen"]) == 2
    res = CliRunner().invoke(cli, ["search", *paths, "--holdout", "200", "--data", DATA,
                                   "--model", MODEL, "--device", "cpu", "--from-epoch", "2"])
    assert res.exit_code == 0, res.output
    assert "<- best" in res.stdout and len([ln for ln in res.stdout.splitlines()
                                            if ln.strip().startswith(("2 ", "3 "))]) == 2


def test_cli_subprocess_user_mistake_is_one_line(tmp_path):
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30)})
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "search", *paths, "--data", DATA,
                           "--model", MODEL, "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--holdout: missing" in proc.stderr
    assert "(of the first --train-images)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_search_and_soup_of_a_train_run_use_its_held_out_images(tmp_path):
    """`train --holdout 8` on 48 images: selection scores on images 40..47 by default."""
    from ckptavg.train import TrainConfig, train
    from tests.fakedata import write_mnist

    data = str(tmp_path / "data")
    write_mnist(data, n_train=48, n_test=16)
    run = train(TrainConfig(model="tests.fakedata:tiny_bn", data="fashion-mnist", data_dir=data,
                            epochs=4, out=str(tmp_path / "run"), schedule="swa", lr=0.05,
                            swa_start=2, swa_lr=0.01, batch_size=16, holdout=8), device="cpu")
    common = dict(model="tests.fakedata:tiny_bn", data=DataOptions(data_dir=data),
                  loader=LoaderOptions(device="cpu"))
    s = ckptavg.search(run.checkpoints, tmp_path / "w.safetensors",
                       selection=Selection(from_epoch=2), **common)
    assert s.holdout == "fashion-mnist:train[40:48]" and s.holdout_samples == 8
    assert [w.start_epoch for w in s.windows] == [2, 3, 4]
    meta = ckptavg.load(tmp_path / "w.safetensors")[1]
    assert meta["bn.data"] == "fashion-mnist:train:first40:augment" and meta["bn.stale"] == "false"
    u = ckptavg.soup(run.checkpoints, uniform=True, test=True, **common)
    assert u.test_accuracy is not None and len(u.chosen) == 4


def test_profile_search_scores_each_profile_and_writes_the_best(tmp_path):
    """Each profile's held-out score is that of its float64 weighted mean (computed here,
    with the profile's weights from the issue's formulas by hand); the written choice is
    `average --profile` of the same files, bit for bit."""
    degs = [170, 120, 60, 20, -10]  # the later checkpoints are the better ones
    states = {f"epoch-{i + 1:04d}": rotated(d) for i, d in enumerate(degs)}
    paths = write(tmp_path, states)
    seq = list(states.values())
    out = tmp_path / "best.safetensors"
    specs = ["uniform", "wsm:linear", "time", "ema:halflife=0.5"]
    r = ckptavg.search_profiles(paths, specs, out, heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL, loader=LoaderOptions(device="cpu"))
    # epochs 1..5, equal spacing: uniform = wsm:linear = time; ema with a half-life of half an
    # epoch: weight of epoch i is integral over (i-1, i] of 2^(-2 (5 - t)).
    ema = [2.0 ** (-2 * (5 - i)) - 2.0 ** (-2 * (5 - i + 1)) for i in range(1, 6)]
    want_w = {"uniform": [0.2] * 5, "wsm:linear": [0.2] * 5, "time": [0.2] * 5,
              "ema:halflife=0.5": [w / sum(ema) for w in ema]}

    def wmean(ws):
        return {k: sum(w * s[k].double() for w, s in zip(ws, seq)).float() for k in seq[0]}

    assert [p.profile for p in r.profiles] == specs
    for p in r.profiles:
        assert p.weights == pytest.approx(want_w[p.profile])
        assert p.holdout_accuracy == pytest.approx(accuracy(wmean(want_w[p.profile])))
        assert p.holdout_loss == pytest.approx(loss(wmean(want_w[p.profile])), rel=1e-5)
    best = max(r.profiles, key=lambda p: (p.holdout_accuracy, -p.holdout_loss))
    assert r.best.profile == best.profile == "ema:halflife=0.5"
    ckptavg.average(paths, tmp_path / "engine.safetensors", profile=best.profile)
    saved, meta = ckptavg.load(out)
    engine, _ = ckptavg.load(tmp_path / "engine.safetensors")
    assert all(torch.equal(saved[k], engine[k]) for k in engine)
    assert meta["select.method"] == "profile-search"
    assert meta["average.profile"] == "ema:halflife=0.5"
    assert meta["select.profiles"] == ";".join(specs)


def test_profile_search_through_the_cli(tmp_path):
    paths = write(tmp_path, {f"epoch-{i + 1:04d}": rotated(d)
                             for i, d in enumerate([90, 45, 10])})
    r = CliRunner().invoke(cli, ["search", *paths, "--profiles",
                                 "uniform,ema:decay=0.5,per=1,power:gamma=3", "--holdout",
                                 "200", "--data", DATA, "--model", MODEL, "--json"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.stdout)
    assert [p["profile"] for p in body["profiles"]] == ["uniform", "ema:decay=0.5,per=1",
                                                         "power:gamma=3"]


def test_a_plot_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """Outputs written by other code into an atomic file (a matplotlib PNG) fail as the
    writers do: one line naming the output, no temporary file (RLIMIT_FSIZE stands in for
    a full disk)."""
    import resource

    pytest.importorskip("matplotlib")
    paths = write(tmp_path, {f"epoch-{i + 1:04d}": rotated(d) for i, d in enumerate([90, 10])})
    png = tmp_path / "search.png"

    def limits():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run([sys.executable, "-m", "ckptavg", "search", *paths, "--plot", str(png),
                           "--holdout", "200", "--data", DATA, "--model", MODEL], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limits)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{png}: cannot write the output" in lines[0], proc.stderr
    assert not png.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("command", ["soup", "search", "profiles"])
def test_run_again_over_a_glob_that_caught_its_output_leaves_it_out_and_replaces_it(
        tmp_path, command):
    """As `average`: the earlier output among the inputs is left out (said), the same
    command replaces it with the same choice; a snapshot as the output is still refused."""
    paths = write(tmp_path, {"a": rotated(30), "b": rotated(-30), "c": rotated(180)})
    out = str(tmp_path / "chosen.safetensors")
    glob = str(tmp_path / "*.safetensors")
    kw = dict(heldout=HeldOutOptions(holdout=200), data=DATA, model=MODEL,
              loader=LoaderOptions(device="cpu"))

    def run(inputs, output):
        if command == "soup":
            return ckptavg.soup(inputs, output, **kw)
        if command == "search":
            return ckptavg.search(inputs, output, **kw)
        return ckptavg.search_profiles(inputs, ["uniform", "ema:halflife=1"], output, **kw)

    first = run([glob], out)
    before = ckptavg.load(out)[0]
    assert not any("left out" in w for w in first.warnings)
    second = run([glob], out)
    assert any(w.startswith(out) and "left out" in w for w in second.warnings)
    after, meta = ckptavg.load(out)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    files = {e["file"] for e in json.loads(meta["average.inputs"])}
    assert files <= {"a.safetensors", "b.safetensors", "c.safetensors"}  # never itself
    snapshot = open(paths[0], "rb").read()
    with pytest.raises(CkptavgError, match="is one of the inputs"):
        run([glob], paths[0])
    assert open(paths[0], "rb").read() == snapshot
