"""Averaging profiles (ckptavg/profiles.py): each profile's weights against the issue's
formulas computed here by hand or by numerical integration, for unequal spacings; the
output against the float64 weighted mean; errors naming --profile."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.engine import profiles
from ckptavg.options import Selection
from tests.conftest import run_cli

STEPS = [100, 300, 350, 800, 1000]  # unequal spacing


def _intervals(t):
    gaps = [t[1] - t[0]] + [b - a for a, b in zip(t, t[1:])]
    return [(ti - d, ti) for ti, d in zip(t, gaps)], gaps


def _integrate(k, a, b, n=200_000):
    """Midpoint rule: an independent reference for the closed forms."""
    x = np.linspace(a, b, n + 1)
    mid = (x[:-1] + x[1:]) / 2
    return float(np.sum(k(mid)) * (b - a) / n)


def _normalised(raw):
    total = sum(raw)
    return [r / total for r in raw]


@pytest.mark.parametrize("halflife", [50.0, 400.0])
def test_ema_halflife_is_the_kernel_integrated_over_each_interval(halflife):
    spans, _ = _intervals(STEPS)
    T = STEPS[-1]
    want = _normalised([_integrate(lambda t: 2.0 ** (-(T - t) / halflife), a, b)
                        for a, b in spans])
    got = profiles.weights(profiles.parse(f"ema:halflife={halflife}"), STEPS)
    assert got == pytest.approx(want, rel=1e-6)


def test_ema_decay_per_is_the_same_profile_as_its_halflife():
    # decay 0.5 per 200 steps is a half-life of 200 steps
    a = profiles.weights(profiles.parse("ema:decay=0.5,per=200"), STEPS)
    b = profiles.weights(profiles.parse("ema:halflife=200"), STEPS)
    assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_sigma_rel_gamma_is_edm2s_root_and_weights_integrate_t_gamma(sigma_rel):
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])  # EDM2's cubic
    gamma = float(roots.real[np.isclose(roots.imag, 0)].max())
    p = profiles.parse(f"power:sigma_rel={sigma_rel}")
    assert p.gamma == pytest.approx(gamma, rel=1e-9)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel)
    spans, _ = _intervals(STEPS)
    want = _normalised([_integrate(lambda x: x ** gamma / 1000.0 ** gamma, max(a, 0), b)
                        for a, b in spans])
    assert profiles.weights(p, STEPS) == pytest.approx(want, rel=1e-5)


def test_power_gamma_starts_from_zero_when_the_first_interval_reaches_below_it():
    pos = [1, 4, 5]  # D_1 = D_2 = 3: the first interval is (-2, 1]
    got = profiles.weights(profiles.parse("power:gamma=2"), pos)
    raw = [(1 ** 3 - 0) / 3, (4 ** 3 - 1 ** 3) / 3, (5 ** 3 - 4 ** 3) / 3]  # by hand
    assert got == pytest.approx(_normalised(raw), rel=1e-12)


@pytest.mark.parametrize("decay,f", [
    ("linear", lambda x: 1 - x),
    ("minus-sqrt", lambda x: 1 - math.sqrt(x)),
    ("cosine", lambda x: (1 + math.cos(math.pi * x)) / 2),
])
def test_wsm_weights_are_the_decay_differences(decay, f):
    spans, gaps = _intervals(STEPS)
    t0, T = STEPS[0] - gaps[0], STEPS[-1]
    xs = [0.0] + [(t - t0) / (T - t0) for t in STEPS]
    want = _normalised([f(a) - f(b) for a, b in zip(xs, xs[1:])])
    assert profiles.weights(profiles.parse(f"wsm:{decay}"), STEPS) == pytest.approx(want)


def test_wsm_linear_on_equal_spacing_is_uniform_and_time_counts_the_gaps():
    assert profiles.weights(profiles.parse("wsm:linear"), [10, 20, 30, 40]) == \
        pytest.approx([0.25] * 4)
    # time: D = (200, 200, 50, 450, 200) over 1100
    assert profiles.weights(profiles.parse("time"), STEPS) == \
        pytest.approx([200 / 1100, 200 / 1100, 50 / 1100, 450 / 1100, 200 / 1100])
    assert profiles.weights(profiles.parse("uniform"), STEPS) == pytest.approx([0.2] * 5)
    assert profiles.effective_n([0.2] * 5) == pytest.approx(5.0)


def test_saves_every_100_or_every_1000_steps_get_the_same_profile():
    """The issue's point: a decay means the same for any save interval."""
    dense = list(range(100, 10_001, 100))
    sparse = list(range(1000, 10_001, 1000))
    p = profiles.parse("ema:halflife=2000")
    wd, ws = profiles.weights(p, dense), profiles.weights(p, sparse)
    # the weight of the last 1000 steps is the same whichever way they were saved
    assert sum(wd[-10:]) == pytest.approx(ws[-1], rel=1e-9)


def test_specs_split_on_the_commas_that_start_a_profile():
    assert profiles.split_specs("ema:decay=0.9,per=100,power:sigma_rel=0.1,wsm:linear,time") == \
        ["ema:decay=0.9,per=100", "power:sigma_rel=0.1", "wsm:linear", "time"]


def _run(tmp_path, steps):
    paths = []
    g = torch.Generator().manual_seed(5)
    for i, s in enumerate(steps):
        p = tmp_path / f"ck-{i}.safetensors"
        save_file({"w": torch.randn(7, 3, generator=g), "h": torch.randn(4, generator=g).half(),
                   "n": torch.tensor(s)}, p, metadata={"train.step": str(s)})
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("spec", ["ema:halflife=300", "power:sigma_rel=0.1", "wsm:minus-sqrt",
                                  "time"])
def test_the_output_is_the_float64_weighted_mean(tmp_path, spec):
    paths = _run(tmp_path, STEPS)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "--profile", spec, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    w = profiles.weights(profiles.parse(spec), STEPS)
    assert body["weights"] == pytest.approx(w) and body["profile"] == spec
    assert body["effective_n"] == pytest.approx(1 / sum(x * x for x in w))
    states = [load_file(p) for p in paths]
    got = load_file(out)
    for k in ("w", "h"):
        want = sum(wi * s[k].double() for wi, s in zip(w, states)) / sum(w)
        torch.testing.assert_close(got[k].double(), want, rtol=0,
                                   atol=1e-6 if k == "w" else 1e-3)
    assert torch.equal(got["n"], states[-1]["n"])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["average.profile"] == spec and meta["average.method"] == "profile"


def test_profiles_go_with_selection_and_torch_outputs(tmp_path):
    paths = _run(tmp_path, STEPS)
    out = tmp_path / "avg.pt"
    r = ckptavg.average(paths, out, profile="ema:halflife=300", selection=Selection(from_step=300))
    w = profiles.weights(profiles.parse("ema:halflife=300"), STEPS[1:])
    assert r.weights == pytest.approx(w)
    got = torch.load(out, weights_only=True)  # safetensors in: a bare state dict out
    assert got.ckptavg_metadata["average.profile"] == "ema:halflife=300"


def test_dry_run_shows_each_weight_and_the_effective_number(tmp_path):
    paths = _run(tmp_path, STEPS)
    proc = run_cli("average", *paths, "--profile", "wsm:linear", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "profile wsm:linear, effective number of snapshots" in proc.stdout
    assert not os.path.exists(tmp_path / "avg.safetensors")


@pytest.mark.parametrize("spec,message", [
    ("emaa:halflife=3", "unknown profile 'emaa'; did you mean ema?"),
    ("ema:halflife=0", "the half-life must be more than 0"),
    ("ema:halflife=-5", "the half-life must be more than 0"),
    ("ema:halflife", "'halflife' is not KEY=VALUE"),
    ("ema:decay=1.5,per=10", "decay must be in (0, 1)"),
    ("power:sigma_rel=0.5", "sigma_rel must be in"),
    ("wsm:exp", "wsm needs a decay"),
    ("time:x=1", "time takes no parameters"),
])
def test_a_bad_spec_is_one_line_naming_profile(tmp_path, spec, message):
    paths = _run(tmp_path, STEPS[:2])
    proc = run_cli("average", *paths, "--profile", spec, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: --profile ") and \
        message in lines[0], lines


def test_inputs_without_positions_are_named(tmp_path):
    for v, name in enumerate(("a", "b")):
        save_file({"w": torch.full((2,), float(v))}, tmp_path / f"{name}.safetensors")
    proc = run_cli("average", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                   "--profile", "time", "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 2 and "--profile" in proc.stderr and "a.safetensors" in proc.stderr
    proc = run_cli("average", tmp_path / "a.safetensors", "--profile", "time", "--weights", "1",
                   "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 2 and "--profile / --weights: exclude each other" in proc.stderr
