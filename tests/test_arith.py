"""The engine's rounding and arithmetic against independent references: exact rationals
(fractions.Fraction) for the rounding, float64 sums written out in the test for the means,
and a fresh interpreter to see that averaging safetensors files never imports torch."""

import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.engine import arith
from ckptavg.io import dtypes
from tests.conftest import average_without_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_values(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of a 16-bit float format and its bit pattern, sorted by value
    (bfloat16: the top half of a float32; float16: numpy's own)."""
    pats = np.arange(1 << 16, dtype=np.uint32)
    if bits == 8:  # bfloat16
        with np.errstate(invalid="ignore"):  # the NaN patterns
            vals = (pats << 16).view(np.float32).astype(np.float64)
    else:
        vals = pats.astype(np.uint16).view(np.float16).astype(np.float64)
    keep = np.isfinite(vals) & ~((vals == 0) & (pats >= 0x8000))  # one zero
    order = np.argsort(vals[keep], kind="stable")
    return vals[keep][order], pats[keep][order]


def reference_round(x: float, vals: np.ndarray, pats: np.ndarray, top: Fraction) -> int:
    """The pattern nearest to x (exact rational distances), ties to the even pattern;
    beyond the largest finite value by half its spacing or more (`top`): infinity."""
    if abs(Fraction(x)) >= top:
        inf = 0x7F80 if pats[-1] == 0x7F7F else 0x7C00  # bfloat16's, float16's
        return inf | (0x8000 if x < 0 else 0)
    i = int(np.searchsorted(vals, x))
    cands = [j for j in (i - 1, i) if 0 <= j < len(vals)]
    best = min(cands, key=lambda j: (abs(Fraction(float(vals[j])) - Fraction(x)), int(pats[j]) & 1))
    p = int(pats[best])
    if vals[best] == 0 and (x < 0 or (x == 0 and np.signbit(x))):
        p |= 0x8000  # a negative value that rounds to zero keeps its sign
    return p


def _hard_cases(vals: np.ndarray, rng: np.random.Generator, n: int = 4000) -> np.ndarray:
    """Midpoints between neighbours (ties), points a hair either side of them (where
    rounding through float32 first goes wrong), and random values, across the range."""
    picks = rng.integers(0, len(vals) - 1, n)
    lo, hi = vals[picks], vals[picks + 1]
    mid = (lo + hi) / 2  # exact in float64
    hair = np.abs(mid) * 2.0 ** -40
    tiny = np.array([0.0, -0.0, 2.0 ** -140, -(2.0 ** -135) * 3, 2.0 ** -133 * 1.5, 5e-324])
    return np.concatenate([mid, mid + hair, mid - hair, rng.standard_normal(n), tiny])


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_rounding_once_to_nearest_even_matches_exact_rationals(name):
    bits = 8 if name == "bfloat16" else 11
    vals, pats = _all_values(bits)
    spacing = Fraction(float(vals[-1])) - Fraction(float(vals[-2]))
    top = Fraction(float(vals[-1])) + spacing / 2
    x = _hard_cases(vals, np.random.default_rng(1))
    dt = getattr(dtypes, name)
    out = np.empty(x.size, arith.storage(dt))
    arith.narrow(out, x, dt, arith.Scratch(x.size, np.dtype(np.float64)))
    got = out.view(np.uint16)
    want = [reference_round(float(v), vals, pats, top) for v in x]
    wrong = [(float(v), hex(g), hex(w)) for v, g, w in zip(x, got, want) if g != w]
    assert not wrong, wrong[:5]


def test_bfloat16_overflow_and_non_finite():
    top = (2 - 2 ** -7) * 2.0 ** 127
    half_ulp = 2.0 ** 119
    x = np.array([top, top + half_ulp * 0.99, top + half_ulp, -top - half_ulp, np.inf,
                  -np.inf, np.nan])
    out = np.empty(x.size, np.uint16)
    arith.round_bfloat16(out, x, arith.Scratch(x.size, np.dtype(np.float64)))
    assert [hex(v) for v in out] == ["0x7f7f", "0x7f7f", "0x7f80", "0xff80", "0x7f80",
                                     "0xff80", "0x7fc0"]


def test_torch_rounds_twice_where_ckptavg_rounds_once():
    """The reason arith does its own rounding: torch goes float64 -> float32 -> bfloat16."""
    x = np.array([1 + 2 ** -8 + 2 ** -40])  # just above the tie between 1 and 1 + 2^-7
    via_torch = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).item()
    out = np.empty(1, np.uint16)
    arith.round_bfloat16(out, x, arith.Scratch(1, np.dtype(np.float64)))
    assert via_torch == 0x3F80  # 1.0: the float32 rounding landed on the tie, then to even
    assert int(out[0]) == 0x3F81  # 1 + 2^-7: the nearest


def _write(tmp_path, tensors: list[dict], name="e"):
    paths = []
    for i, t in enumerate(tensors):
        p = tmp_path / f"{name}{i}.safetensors"
        save_file(t, str(p), metadata={"train.epoch": str(i)})
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_average_is_the_float64_mean_rounded_once(tmp_path, in_dtype, out_dtype):
    g = torch.Generator().manual_seed(3)
    # 3 inputs: means in thirds, which are never exact, over several chunks and blocks
    states = [{"w": (torch.randn(300_001, generator=g) * 3).to(in_dtype)} for _ in range(3)]
    out = tmp_path / "avg.safetensors"
    ckptavg.average(_write(tmp_path, states), out, dtype=out_dtype)
    xs = [s["w"].double().numpy() for s in states]
    mean = ((xs[0] + xs[1]) + xs[2]) / 3
    vals, pats = _all_values(8 if out_dtype == "bfloat16" else 11)
    got = load_file(out)["w"]
    if out_dtype == "float32":
        assert np.array_equal(got.numpy(), mean.astype(np.float32))
        return
    bits = got.view(torch.int16).numpy().view(np.uint16)
    picks = np.random.default_rng(0).integers(0, mean.size, 3000)
    top = Fraction(float(vals[-1])) * 2  # no overflow here
    assert [int(bits[i]) for i in picks] == [reference_round(float(mean[i]), vals, pats, top)
                                            for i in picks]
    # and every element: numpy's float16 cast is correctly rounded (checked above)
    if out_dtype == "float16":
        assert np.array_equal(bits, mean.astype(np.float16).view(np.uint16))


def test_weighted_mean_multiplies_then_adds_in_input_order(tmp_path):
    g = torch.Generator().manual_seed(4)
    states = [{"w": torch.randn(200_000, generator=g)} for _ in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    out = tmp_path / "avg.safetensors"
    ckptavg.average(_write(tmp_path, states), out, weights=w)
    xs = [s["w"].double().numpy() for s in states]
    total = xs[0] * w[0]
    for x, wi in zip(xs[1:], w[1:]):
        total = total + x * wi
    assert np.array_equal(load_file(out)["w"].numpy(), (total / sum(w)).astype(np.float32))


@pytest.mark.parametrize("n", [3, 11])  # 11: more inputs than are read at once (GROUP = 4)
def test_threads_give_the_same_bytes(tmp_path, n, monkeypatch):
    from ckptavg.engine import kernel

    monkeypatch.setattr(kernel, "GROUP", 4)
    g = torch.Generator().manual_seed(5)
    states = [{"a": torch.randn(700_000, generator=g), "b": torch.randn(5, generator=g).bfloat16()}
              for _ in range(n)]
    paths = _write(tmp_path, states)
    outs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}.safetensors"
        ckptavg.average(paths, out, threads=threads)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    xs = [s["a"].double().numpy() for s in states]
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    assert np.array_equal(load_file(tmp_path / "t1.safetensors")["a"].numpy(),
                          (total / n).astype(np.float32))


def test_float8_inputs_average_through_torchs_table(tmp_path):
    g = torch.Generator().manual_seed(6)
    states = [{"w": torch.randn(5000, generator=g).to(torch.float8_e4m3fn)} for _ in range(3)]
    out = tmp_path / "avg.safetensors"
    ckptavg.average(_write(tmp_path, states), out)
    mean = sum(s["w"].double() for s in states) / 3
    got = load_file(out)["w"]
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.view(torch.uint8), mean.to(torch.float8_e4m3fn).view(torch.uint8))


def test_averaging_safetensors_never_imports_torch(tmp_path):
    g = torch.Generator().manual_seed(7)
    paths = _write(tmp_path, [{"w": torch.randn(1000, generator=g), "n": torch.tensor(i)}
                              for i in range(3)])
    out = tmp_path / "avg.safetensors"
    assert average_without_torch(paths, out) == ["0", "False"]
    xs = [load_file(p)["w"].double() for p in paths]
    assert torch.equal(load_file(out)["w"], ((xs[0] + xs[1] + xs[2]) / 3).float())
    assert load_file(out)["n"].item() == 2


def _bf16_nearest(q) -> int:
    """The bfloat16 bit pattern nearest the rational q (ties to even), found by comparing
    exact rationals with the representable neighbours: an independent rounding."""
    from fractions import Fraction

    f32 = np.array([float(q)], np.float32).view(np.uint32)[0]
    base = int(f32) >> 16
    best = None
    for c in (base - 1, base, base + 1, base + 2):
        if not 0 <= c <= 0xFFFF or (c >> 7) & 0xFF == 0xFF:  # outside 16 bits, inf/NaN
            continue
        v = Fraction(float(np.array([c << 16], np.uint32).view(np.float32)[0]))
        key = (abs(v - q), c & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def test_soups_running_sum_rounds_once_to_the_nearest_bfloat16(tmp_path):
    """heldout.RunningSum (soup, search): the mean of bfloat16 inputs is the exact rational
    mean rounded once to the nearest bfloat16 (computed here with fractions), as `average`'s
    is; and the newest input's integer is kept."""
    from fractions import Fraction

    from ckptavg.selection.heldout import RunningSum

    g = torch.Generator().manual_seed(9)
    states = [{"w": torch.randn(3000, generator=g).bfloat16(), "n": torch.tensor(i)}
              for i in range(3)]
    rs = RunningSum()
    for i, s in enumerate(states):
        rs.add(s, i)
    mean = rs.mean()
    got = mean["w"].view(torch.int16).numpy().view(np.uint16)
    cols = [s["w"].float().numpy() for s in states]
    for k in range(3000):
        q = sum(Fraction(float(c[k])) for c in cols) / 3
        assert int(got[k]) == _bf16_nearest(q), k
    assert mean["n"].item() == 2
    out = tmp_path / "avg.safetensors"
    ckptavg.average(_write(tmp_path, states), out)
    assert torch.equal(mean["w"].view(torch.int16), load_file(out)["w"].view(torch.int16))
    # and a mean near a tie is rounded once (torch's .to() would round it to 1.0)
    near = torch.tensor([1 + 2 ** -8 + 2 ** -40], dtype=torch.float64)
    rs2 = RunningSum()
    rs2.add({"w": near.bfloat16()}, 0)  # only to record the dtype
    rs2.sums["w"] = near.clone()
    assert rs2.mean()["w"].view(torch.int16).item() == 0x3F81
