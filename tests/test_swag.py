"""SWAG from saved snapshots: moments and deviations against float64 references computed
here, samples against the formula and against their covariance, and the calibration
metrics on hand-computed examples."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import ckptavg
from ckptavg.cli import cli
from ckptavg.errors import CkptavgError
from ckptavg.nn.calibration import calibration_scores, ece, nll, reliability
from ckptavg.options import LoaderOptions
from ckptavg.selection.swag import SwagPosterior
from tests.fakedata import Blobs

DATA = "tests.fakedata:blobs"
MODEL = "tests.fakedata:linear2"


def snapshots(tmp_path, n=6, seed=0, shape=(2, 2), count=True):
    g = torch.Generator().manual_seed(seed)
    states, paths = [], []
    for i in range(n):
        st = {"weight": torch.randn(*shape, generator=g) + i * 0.1,
              "bias": torch.randn(shape[0], generator=g)}
        if count:
            st["count"] = torch.tensor(i)
        p = str(tmp_path / f"epoch-{i + 1:04d}.safetensors")
        ckptavg.save(st, p, {"model.arch": MODEL, "data.name": DATA, "train.epoch": str(i + 1)})
        states.append(st)
        paths.append(p)
    return states, paths


def test_moments_and_deviations_equal_float64_references(tmp_path):
    states, paths = snapshots(tmp_path, n=6)
    out = tmp_path / "swag.safetensors"
    r = ckptavg.swag(paths, out, rank=4)
    assert r.n == 6 and r.rank == 4 and r.deviations == paths[-4:]
    saved, meta = ckptavg.load(out)
    for k in ("weight", "bias"):
        x = torch.stack([s[k].double() for s in states])  # [N, ...]
        mean = x.mean(0)
        assert torch.equal(saved["mean." + k], mean.float())
        var = x.var(0, unbiased=False).clamp_min(1e-30)  # two-pass, not E[x^2] - mean^2
        assert torch.allclose(saved["var." + k].double(), var, rtol=1e-6, atol=1e-12)
        assert saved["dev." + k].shape == (4, *states[0][k].shape)
        assert torch.allclose(saved["dev." + k].double(), (x[-4:] - mean).float().double(),
                              atol=1e-7)
    assert torch.equal(saved["mean.count"], torch.tensor(5))  # the newest input's integer
    assert "var.count" not in saved and "dev.count" not in saved
    assert meta["swag.rank"] == "4" and meta["swag.n"] == "6"
    assert json.loads(meta["swag.deviations"]) == [f"epoch-{i:04d}.safetensors" for i in (3, 4, 5, 6)]


def test_variance_is_clamped_and_rank_falls_to_the_snapshot_count(tmp_path):
    paths = []
    for i in range(3):
        p = str(tmp_path / f"c{i}.safetensors")
        ckptavg.save({"w": torch.tensor([1.0, float(i)])}, p)  # w[0] never moves
        paths.append(p)
    r = ckptavg.swag(paths, tmp_path / "s.safetensors")
    assert r.rank == 3 and r.warnings
    saved, _ = ckptavg.load(tmp_path / "s.safetensors")
    assert saved["var.w"][0].item() == pytest.approx(1e-30) and saved["var.w"][0] > 0
    with pytest.raises(CkptavgError, match="2 or more"):
        ckptavg.swag(paths, tmp_path / "t.safetensors", rank=1)
    with pytest.raises(CkptavgError, match="SWAG needs 2 or more"):
        ckptavg.swag(paths[:1], tmp_path / "t.safetensors")
    with pytest.raises(CkptavgError, match="a .safetensors file or a folder"):
        ckptavg.swag(paths, tmp_path / "t.pt")


def test_scale_zero_samples_are_the_swa_mean_exactly(tmp_path):
    states, paths = snapshots(tmp_path)
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=3)
    ckptavg.average(paths, tmp_path / "swa.safetensors")
    swa, _ = ckptavg.load(tmp_path / "swa.safetensors")
    with SwagPosterior(tmp_path / "s.safetensors") as post:
        for diag in (False, True):
            s = post.sample(0.0, diag, torch.Generator().manual_seed(3))
            assert all(torch.equal(s[k], swa[k]) for k in swa)


def test_a_sample_follows_the_formula(tmp_path):
    """mean + sqrt(scale) * (sqrt(var) * z1 + dev^T z2 / sqrt(K - 1)), z2 drawn first."""
    states, paths = snapshots(tmp_path, n=5)
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=4)
    saved, _ = ckptavg.load(tmp_path / "s.safetensors")
    with SwagPosterior(tmp_path / "s.safetensors") as post:
        got = post.sample(0.5, False, torch.Generator().manual_seed(11))
        diag = post.sample(0.5, True, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    z2 = torch.randn(4, generator=g, dtype=torch.float64)
    for k in post.keys:
        if k == "count":
            continue
        z1 = torch.randn(saved["mean." + k].shape, generator=g, dtype=torch.float64)
        var_part = saved["var." + k].double().sqrt() * z1
        low_rank = sum(z2[j] * saved["dev." + k][j].double() for j in range(4)) / math.sqrt(3)
        mean = saved["mean." + k].double()
        assert torch.allclose(got[k].double(), mean + math.sqrt(0.5) * (var_part + low_rank),
                              atol=1e-6)
        assert torch.allclose(diag[k].double(), mean + math.sqrt(0.5) * var_part, atol=1e-6)


def test_samples_have_the_expected_covariance(tmp_path):
    """Cov = scale * (diag(var) + D^T D / (K - 1)), checked entry by entry within 5
    standard errors of a sample covariance over M draws (fixed seed)."""
    states, paths = snapshots(tmp_path, n=8, seed=5, shape=(2, 1))
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=5)
    saved, _ = ckptavg.load(tmp_path / "s.safetensors")
    scale, m = 0.7, 4000
    with SwagPosterior(tmp_path / "s.safetensors") as post:
        draws = torch.stack([torch.cat([post.sample(scale, False, torch.Generator().manual_seed(i))[k]
                                        .double().flatten() for k in ("weight", "bias")])
                             for i in range(m)])
    var = torch.cat([saved["var." + k].double().flatten() for k in ("weight", "bias")])
    dev = torch.cat([saved["dev." + k].double().reshape(5, -1) for k in ("weight", "bias")], 1)
    expect = scale * (torch.diag(var) + dev.T @ dev / 4)
    mean = torch.cat([saved["mean." + k].double().flatten() for k in ("weight", "bias")])
    assert torch.allclose(draws.mean(0), mean, atol=5 * math.sqrt(expect.diag().max() / m))
    got = torch.cov(draws.T)
    se = ((expect.diag()[:, None] * expect.diag()[None, :] + expect ** 2) / (m - 1)).sqrt()
    assert ((got - expect).abs() <= 5 * se).all(), (got, expect)
    # and not the diagonal-only covariance: the low-rank part is there
    assert ((torch.diag(var) * scale - got).abs() > 5 * se).any()


def test_calibration_metrics_on_hand_computed_examples():
    probs = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 0])
    # confidences 0.9 (right), 0.65 (wrong), 0.7 (right), 0.8 (wrong); 15 bins
    assert ece(probs, labels) == pytest.approx((0.1 + 0.65 + 0.3 + 0.8) / 4)
    assert nll(probs, labels) == pytest.approx(-(math.log(0.9) + math.log(0.35)
                                                 + math.log(0.7) + math.log(0.2)) / 4)
    bins = reliability(probs, labels)
    assert len(bins) == 15 and sum(b.count for b in bins) == 4
    assert bins[13].count == 1 and bins[13].accuracy == 1.0  # 0.9 in (13/15, 14/15]
    assert bins[9].count == 1 and bins[9].accuracy == 0.0  # 0.65 in (9/15, 10/15]
    # Two samples in one bin: |mean accuracy - mean confidence| of the bin
    p2 = torch.tensor([[0.95, 0.05], [0.97, 0.03]])
    assert ece(p2, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.96))
    s = calibration_scores(probs, labels)
    assert s.accuracy == 50.0 and s.samples == 4


def _swa_probs(states, x):
    """Softmax of the float64 mean of the snapshots: the SWA prediction, computed here."""
    w = torch.stack([s["weight"].double() for s in states]).mean(0)
    b = torch.stack([s["bias"].double() for s in states]).mean(0)
    return torch.softmax(x @ w.T + b, 1)


def test_evaluate_swag_at_scale_0_is_the_swa_mean(tmp_path):
    """scale 0: every draw is the SWA mean, so SWAG's row is the softmax of the float64 mean
    of the snapshots computed here (not by the code under test)."""
    states, paths = snapshots(tmp_path, n=6, seed=1, count=False)
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=4)
    r = ckptavg.evaluate_swag(tmp_path / "s.safetensors", [paths[-1]], samples=3, scale=0.0,
                              seed=2, model=MODEL, data=DATA, loader=LoaderOptions(device="cpu"))
    assert [row.name for row in r.rows] == ["SWAG", "SWA", paths[-1]]
    x, y = Blobs(200, 1).x.double(), Blobs(200, 1).y
    probs = _swa_probs(states, x)
    for row in r.rows[:2]:
        assert row.accuracy == pytest.approx(float((probs.argmax(1) == y).double().mean() * 100))
        assert row.nll == pytest.approx(-float(probs[torch.arange(200), y].log().mean()), rel=1e-5)
    last = states[-1]
    p_last = torch.softmax(x @ last["weight"].double().T + last["bias"].double(), 1)
    assert r.rows[2].nll == pytest.approx(-float(p_last[torch.arange(200), y].log().mean()),
                                          rel=1e-5)


def test_swag_draws_have_the_papers_mean_and_covariance(tmp_path):
    """Draws at scale s: mean theta_SWA and covariance s * (diag(var) + D D^T / (K - 1))
    (Maddox et al. 2019, Eq. 1 with the authors' scale), D the last K snapshots minus the
    mean; moments of 10,000 draws against the covariance built here from the snapshots."""
    states, paths = snapshots(tmp_path, n=6, seed=3, count=False)
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=4)
    x = torch.stack([torch.cat([s["weight"].double().reshape(-1), s["bias"].double()])
                     for s in states])  # [6, 6]
    mean = x.mean(0)
    dev = x[-4:] - mean
    scale = 0.5
    cov = scale * (torch.diag(x.var(0, unbiased=False)) + dev.T @ dev / 3)
    g = torch.Generator().manual_seed(0)
    with SwagPosterior(tmp_path / "s.safetensors") as post:
        draws = torch.stack([torch.cat([d["weight"].double().reshape(-1), d["bias"].double()])
                             for d in (post.sample(scale, False, g) for _ in range(10_000))])
    # 4 standard errors of the mean; the covariance within 0.05 of its largest entry
    # (about 3.5 standard errors of an entry's estimate from 10,000 draws)
    assert torch.allclose(draws.mean(0), mean, atol=4 * cov.diag().max().sqrt() / 100)
    emp = torch.cov(draws.T)
    assert torch.allclose(emp, cov, atol=0.05 * cov.abs().max())
    diag_only = SwagPosterior(tmp_path / "s.safetensors")
    with diag_only as post:
        d = torch.stack([torch.cat([s["weight"].double().reshape(-1), s["bias"].double()])
                         for s in (post.sample(scale, True, g) for _ in range(10_000))])
    want = scale * x.var(0, unbiased=False)
    assert torch.allclose(torch.cov(d.T).diag(), want, rtol=0.05)
    off = torch.cov(d.T) - torch.diag(torch.cov(d.T).diag())
    assert off.abs().max() < 0.05 * want.max()  # SWAG-diagonal: no correlations


def test_evaluate_swag_draws_are_seeded(tmp_path):
    states, paths = snapshots(tmp_path, n=6, seed=1, count=False)
    ckptavg.swag(paths, tmp_path / "s.safetensors", rank=4)
    kw = dict(samples=5, scale=0.5, model=MODEL, data=DATA, loader=LoaderOptions(device="cpu"))
    a = ckptavg.evaluate_swag(tmp_path / "s.safetensors", seed=2, **kw)
    b = ckptavg.evaluate_swag(tmp_path / "s.safetensors", seed=2, **kw)
    c = ckptavg.evaluate_swag(tmp_path / "s.safetensors", seed=3, **kw)
    assert a.rows[0].nll == b.rows[0].nll and a.rows[0].nll != c.rows[0].nll
    assert a.rows[1].nll == c.rows[1].nll  # the SWA row takes no draw


def test_swag_of_a_batchnorm_run_and_the_cli(tmp_path):
    from ckptavg.train import TrainConfig, train
    from tests.fakedata import write_mnist

    data = str(tmp_path / "data")
    write_mnist(data, n_train=48, n_test=16)
    run = train(TrainConfig(model="tests.fakedata:tiny_bn", data="fashion-mnist", data_dir=data,
                            epochs=4, out=str(tmp_path / "run"), schedule="swa", lr=0.05,
                            swa_start=2, swa_lr=0.01, batch_size=16), device="cpu")
    res = CliRunner().invoke(cli, ["swag", *run.checkpoints, "-o", str(tmp_path / "swag"),
                                   "--rank", "3", "--from-epoch", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n"] == 3
    assert (tmp_path / "swag" / "model.safetensors.index.json").exists()  # a folder output
    res = CliRunner().invoke(cli, ["eval", "--swag", str(tmp_path / "swag"), run.checkpoints[-1],
                                   "--model", "tests.fakedata:tiny_bn", "--data-dir", data,
                                   "--samples", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [row["name"] for row in out["rows"]] == ["SWAG", "SWA", run.checkpoints[-1]]
    assert all(0 <= row["ece"] <= 1 and row["samples"] == 16 for row in out["rows"])
    res = CliRunner().invoke(cli, ["eval", "--swag", run.checkpoints[-1], "--data-dir", data,
                                   "--model", "tests.fakedata:tiny_bn", "--device", "cpu"])
    assert res.exit_code == 1 and "not a SWAG file" in res.output
    res = CliRunner().invoke(cli, ["eval", *run.checkpoints[:2]])
    assert res.exit_code == 2


def test_swag_run_again_over_a_glob_that_caught_its_output_replaces_it(tmp_path):
    """As `average`: the earlier SWAG file among the inputs is left out (said) and the same
    command replaces it with the same moments; a snapshot as the output is refused."""
    states, paths = snapshots(tmp_path, n=4)
    out = str(tmp_path / "swag.safetensors")
    glob = str(tmp_path / "*.safetensors")
    ckptavg.swag([glob], out, rank=2)
    before = ckptavg.load(out)[0]
    r = ckptavg.swag([glob], out, rank=2)
    assert r.n == 4 and any(w.startswith(out) and "left out" in w for w in r.warnings)
    after = ckptavg.load(out)[0]
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in after)
    snapshot = open(paths[0], "rb").read()
    with pytest.raises(ckptavg.CkptavgError, match="is one of the inputs"):
        ckptavg.swag([glob], paths[0], rank=2)
    assert open(paths[0], "rb").read() == snapshot
