"""Profile weights against an exact computation (issue #33, item 6): mpmath at 420 digits,
the kernel integrated in closed form with no cancellation, across the whole accepted range
of every spec; positions parsed strictly, as ASCII integers, and kept exact."""

from __future__ import annotations

import math

import mpmath
import pytest
from safetensors.torch import save_file

from ckptavg.engine import profiles
from ckptavg.io.metadata import ascii_int, meta_int
from tests.conftest import run_cli

mpmath.mp.dps = 420  # enough for a 1e300 half-life over positions of 1e30


def _exact(spec: str, positions: list[int]) -> list[float]:
    """The weights of the module docstring, in 420-digit arithmetic, from the spec's own
    numbers (gamma from sigma_rel by mpmath's root finder, not ours)."""
    name, _, rest = spec.partition(":")
    params = dict(p.split("=") for p in rest.split(",")) if "=" in rest else {}
    t = [mpmath.mpf(x) for x in positions]
    gaps = [t[1] - t[0]] + [b - a for a, b in zip(t, t[1:])]
    starts = [b - d for b, d in zip(t, gaps)]
    T = t[-1]
    if name == "time":
        raw = gaps
    elif name == "ema":
        h = mpmath.mpf(params["halflife"])
        raw = [mpmath.power(2, -(T - b) / h) - mpmath.power(2, -(T - a) / h)
               for a, b in zip(starts, t)]
    elif name == "power":
        if "gamma" in params:
            g = mpmath.mpf(params["gamma"])
        else:
            s = mpmath.mpf(params["sigma_rel"])
            g = mpmath.findroot(lambda g: (g + 1) / ((g + 2) ** 2 * (g + 3)) - s ** 2,
                                (mpmath.mpf(0), 1 / s * 4), solver="anderson")
        raw = [(mpmath.power(b, g + 1) - mpmath.power(max(a, 0), g + 1)) / (g + 1)
               for a, b in zip(starts, t)]
    else:
        t0 = starts[0]
        xs = [mpmath.mpf(0)] + [(x - t0) / (T - t0) for x in t]
        f = {"linear": lambda x: 1 - x, "minus-sqrt": lambda x: 1 - mpmath.sqrt(x),
             "cosine": lambda x: (1 + mpmath.cos(mpmath.pi * x)) / 2}[rest]
        raw = [f(a) - f(b) for a, b in zip(xs, xs[1:])]
    total = mpmath.fsum(raw)
    return [float(x / total) for x in raw]


SPECS = [
    "time", "ema:halflife=1e-3", "ema:halflife=0.5", "ema:halflife=3", "ema:halflife=250",
    "ema:halflife=1e6", "ema:halflife=1e18", "ema:halflife=1e20", "ema:halflife=1e300",
    "power:gamma=-0.999", "power:gamma=-0.5", "power:gamma=0", "power:gamma=6.94",
    "power:gamma=300", "power:gamma=1e6", "power:sigma_rel=0.2886", "power:sigma_rel=0.15",
    "power:sigma_rel=0.05", "power:sigma_rel=0.01", "power:sigma_rel=1e-4",
    "wsm:linear", "wsm:minus-sqrt", "wsm:cosine",
]
POSITIONS = [
    [1, 2, 3], [100, 200, 300], [10_000, 20_000, 30_000], [1, 2, 5, 13, 100],
    [2**63 - 2, 2**63 - 1, 2**63], [2**64 + 1, 2**64 + 2, 2**64 + 10],
    [10**30, 10**30 + 7, 10**30 + 9],
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("positions", POSITIONS, ids=lambda p: f"{p[0]}..{p[-1]}")
def test_weights_match_an_exact_computation(spec, positions):
    got = profiles.weights(profiles.parse(spec), positions)
    want = _exact(spec, positions)
    assert math.isclose(sum(got), 1.0, rel_tol=1e-12)
    for g, w in zip(got, want):
        assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-300), (got, want)


@pytest.mark.parametrize("sigma_rel", [0.2886, 0.1, 0.01, 1e-6, 1e-160])
def test_sigma_rel_gives_the_largest_root(sigma_rel):
    g = mpmath.mpf(profiles.sigma_rel_to_gamma(sigma_rel))
    s = mpmath.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    assert g > 0 and math.isclose(float(s), sigma_rel, rel_tol=1e-12)


@pytest.mark.parametrize("text,want", [
    ("12", 12), (" +7 ", 7), ("-3", -3), (str(2**64 + 1), 2**64 + 1), ("9" * 400, int("9" * 400)),
    ("²", None), ("٣", None), ("1e3", None), ("1_000", None), ("", None), ("0x10", None),
    ("１２", None),
])
def test_positions_are_ascii_integers_kept_exact(text, want):
    assert ascii_int(text) == want
    assert meta_int({"train.step": text}, "train.step") == want


def _three(tmp_path, steps: list[str]):
    import torch

    paths = []
    for i, st in enumerate(steps):
        p = tmp_path / f"m{'abc'[i]}.safetensors"
        save_file({"w": torch.full((4,), float(i))}, str(p), metadata={"train.step": st})
        paths.append(p)
    return paths


def test_a_non_ascii_step_is_no_step_and_no_crash(tmp_path):
    paths = _three(tmp_path, ["²", "٣", "1"])
    proc = run_cli("average", *paths, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("average", *paths, "-o", tmp_path / "p.safetensors", "--profile", "time")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("steps", [[2**63 - 2, 2**63 - 1, 2**63], [2**64 + 1, 2**64 + 2, 2**64 + 3],
                                   [10**399 + 1, 10**399 + 2, 10**399 + 3]],
                         ids=["2**63", "2**64", "400 digits"])
def test_distinct_huge_steps_stay_distinct(tmp_path, steps):
    """Three steps one apart, far past a float's integers: time weights them equally."""
    from safetensors.torch import load_file

    paths = _three(tmp_path, [str(s) for s in steps])
    out = tmp_path / "out.safetensors"
    proc = run_cli("average", *paths, "-o", out, "--profile", "time")
    assert proc.returncode == 0, proc.stderr
    assert load_file(str(out))["w"].tolist() == [1.0] * 4
