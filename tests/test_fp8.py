"""FP8 checkpoints averaged in what their weights mean (issue #36), against references
computed here with torch's own float8 types: each input dequantized with its own scales,
averaged in float64. Per-tensor and per-channel scales (compressed-tensors' `weight_scale`),
128 x 128 block scales (DeepSeek-V3's `weight_scale_inv`, partial blocks at the edges),
unequal scales across inputs; requantized outputs compared after dequantizing. Other
quantized layouts are refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, average_without_torch, leftovers, run_cli

F8 = torch.float8_e4m3fn
TOP = 448.0
EPS = float(torch.finfo(torch.float32).eps)
SCALE = {"tensor": "weight_scale", "channel": "weight_scale", "block": "weight_scale_inv"}


def _expand(s: torch.Tensor, kind: str, shape) -> torch.Tensor:
    if kind != "block":
        return s.double()
    r, c = shape
    return s.double().repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]


def _quantize(w: torch.Tensor, kind: str, f8=F8) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs' own quantization, as the schemes do it."""
    top = float(torch.finfo(f8).max)
    if kind == "tensor":
        s = (w.abs().max() / top).reshape(1)
    elif kind == "channel":
        s = w.abs().amax(1, keepdim=True) / top
    else:
        r, c = w.shape
        pad = torch.nn.functional.pad(w.abs(), (0, -c % 128, 0, -r % 128))
        s = pad.reshape(-(-r // 128), 128, -(-c // 128), 128).amax((1, 3)) / top
    s = s.float()
    return (w / _expand(s, kind, w.shape).float()).clamp(-top, top).to(f8), s


def dequantized(q: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    return q.double() * _expand(s, kind, q.shape)


def _inputs(folder, kind: str, n: int = 3, shape=(200, 300), suffix: str = ".safetensors",
            f8=F8):
    """n FP8 checkpoints with unequal scales (the i-th input's weights i + 1 times larger),
    a bias in bfloat16 and a static input_scale each. safetensors puts the float32 scales
    before the one-byte codes; a torch file keeps the weight first."""
    g = torch.Generator().manual_seed(7)
    paths, values = [], []
    for i in range(n):
        q, s = _quantize(torch.randn(*shape, generator=g) * (i + 1), kind, f8)
        state = {"l.weight": q, f"l.{SCALE[kind]}": s,
                 "l.bias": torch.randn(shape[0], generator=g).bfloat16(),
                 "l.input_scale": torch.tensor([0.01 * (3 - i)])}
        path = os.path.join(folder, f"step-{100 * (i + 1)}{suffix}")
        if suffix == ".pt":
            torch.save(state, path)
        else:
            save_file(state, path)
        paths.append(path)
        values.append(dequantized(q, s, kind))
    mean = values[0]
    for v in values[1:]:
        mean = mean + v  # in input order, as the average folds them
    return paths, mean / n


@pytest.mark.parametrize("f8", [F8, torch.float8_e5m2])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_dequantized_output_is_the_float64_mean_of_what_the_weights_mean(tmp_path, kind, f8):
    paths, mean = _inputs(str(tmp_path), kind, f8=f8)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "--dtype", "float32", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    got = load_file(out)
    assert sorted(got) == ["l.bias", "l.weight"]  # no scales: the values themselves
    assert torch.equal(got["l.weight"], mean.float())  # rounded once from float64
    meta = json.loads(subprocess.run(
        [sys.executable, "-m", "ckptavg", "inspect", str(out), "--json"], capture_output=True,
        text=True, cwd=ROOT).stdout)["metadata"]
    assert "written as float32" in meta["average.quantized"]


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_weights_apply_to_what_each_input_means(tmp_path, kind):
    """--weights over FP8 inputs: each input's dequantized values times its normalised
    weight, summed in input order in float64 (the reference computed here)."""
    g = torch.Generator().manual_seed(11)
    paths, values = [], []
    for i in range(3):
        q, sc = _quantize(torch.randn(150, 260, generator=g) * (i + 1), kind)
        paths.append(str(tmp_path / f"step-{i + 1}.safetensors"))
        save_file({"l.weight": q, f"l.{SCALE[kind]}": sc}, paths[-1])
        values.append(dequantized(q, sc, kind))
    ws = [1.0, 2.5, 0.5]
    norm = [w / sum(ws) for w in ws]
    want = values[0] * norm[0]
    for v, w in zip(values[1:], norm[1:]):
        want = want + v * w
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "--weights", "1,2.5,0.5", "--dtype", "float32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    # sum(w_i x_i) / sum(w_i) with the plan's normalised weights: equal to float32 rounding
    torch.testing.assert_close(load_file(out)["l.weight"].double(), want, rtol=2e-7, atol=1e-9)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_requantized_output_has_the_schemes_scales_and_the_nearest_codes(tmp_path, kind,
                                                                          suffix):
    paths, mean = _inputs(str(tmp_path), kind, suffix=suffix)
    out = tmp_path / f"avg{suffix}"
    proc = run_cli("average", *paths, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert any("input_scale" in w and "largest" in w for w in body["warnings"])
    got = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    q, s = got["l.weight"], got[f"l.{SCALE[kind]}"]
    assert q.dtype == F8 and s.dtype == torch.float32
    # the new scales by the scheme's rule, from the mean computed here
    if kind == "tensor":
        amax = mean.abs().max().reshape(1)
    elif kind == "channel":
        amax = mean.abs().amax(1, keepdim=True)
    else:
        r, c = mean.shape
        pad = torch.nn.functional.pad(mean.abs(), (0, -c % 128, 0, -r % 128))
        amax = pad.reshape(-(-r // 128), 128, -(-c // 128), 128).amax((1, 3))
    assert torch.equal(s, (amax / TOP).clamp(min=EPS).float())
    # each code is the float8 nearest mean / scale: within half a step of it
    target = (mean / _expand(s, kind, mean.shape)).clamp(-TOP, TOP)
    value = q.double()
    step = 2.0 ** (torch.floor(torch.log2(value.abs().clamp(min=2.0 ** -6))) - 3)
    assert bool(((value - target).abs() <= step / 2 + 1e-12).all())
    deq = dequantized(q, s, kind)
    rel = float((deq - mean).norm() / mean.norm())
    assert rel < 0.04  # float8's own rounding; averaging codes and scales apart: ~0.35
    assert got["l.input_scale"].item() == pytest.approx(0.03)  # the largest of the inputs'
    biases = [(load_file(p) if suffix == ".safetensors" else torch.load(p))["l.bias"]
              for p in paths]
    assert torch.equal(got["l.bias"], (sum(b.double() for b in biases) / 3).bfloat16())


def test_fp8_is_averaged_without_importing_torch(tmp_path):
    paths, _ = _inputs(str(tmp_path), "block", shape=(130, 260))
    assert average_without_torch(paths, tmp_path / "avg.safetensors") == ["0", "False"]


def test_a_folder_keeps_or_drops_its_quantization_config(tmp_path):
    """Requantized, the output loads where the inputs load: config.json as it was; written
    in high precision, quantization_config goes."""
    folders = []
    for i, path in enumerate(_inputs(str(tmp_path), "channel")[0]):
        d = tmp_path / f"checkpoint-{100 * (i + 1)}"
        d.mkdir()
        os.rename(path, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(
            {"model_type": "x", "quantization_config": {"quant_method": "compressed-tensors",
                                                        "format": "float-quantized"}}))
        folders.append(d)
    run_cli("average", *folders, "-o", tmp_path / "req", check=True)
    assert "quantization_config" in json.loads((tmp_path / "req" / "config.json").read_text())
    run_cli("average", *folders, "--dtype", "bfloat16", "-o", tmp_path / "deq", check=True)
    cfg = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "x"


def _gptq(folder, i):
    state = {"l.qweight": torch.randint(0, 2**31 - 1, (8, 16), dtype=torch.int32),
             "l.qzeros": torch.zeros(1, 2, dtype=torch.int32),
             "l.scales": torch.rand(1, 16).half() + i, "l.g_idx": torch.zeros(64, dtype=torch.int32)}
    save_file(state, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"quantization_config": {"quant_method": "gptq", "bits": 4}}, f)


@pytest.mark.parametrize("case,needle", [
    ("gptq", "gptq"),
    ("bitsandbytes", "bitsandbytes"),
    ("mxfp4", "no mxfp4 layout"),
    ("fp8 odd scale", "no per-tensor, per-channel or block scale"),
    ("fp8 without scale", "FP8 without a scale"),
    ("fp8 beside int codes", "integer codes beside a scale"),
])
def test_other_quantized_layouts_are_refused_in_one_line(tmp_path, case, needle):
    inputs = []
    for i in range(2):
        d = tmp_path / f"in{i}"
        d.mkdir()
        q = (torch.randn(8, 16) * (i + 1)).to(F8)
        state = {
            "bitsandbytes": {"l.weight": torch.randint(0, 255, (64, 1), dtype=torch.uint8),
                             "l.weight.absmax": torch.rand(4),
                             "l.weight.quant_map": torch.rand(16)},
            "mxfp4": {"e.down_blocks": torch.randint(0, 255, (4, 16), dtype=torch.uint8),
                      "e.down_scales": torch.randint(0, 255, (4, 1), dtype=torch.uint8)},
            "fp8 odd scale": {"l.weight": q, "l.weight_scale": torch.rand(3, 5)},
            "fp8 without scale": {"l.weight": q, "m.weight": q.clone(),
                                  "m.weight_scale": torch.rand(1)},
            "fp8 beside int codes": {"l.weight": q, "l.weight_scale": torch.rand(1),
                                     "m.codes": torch.zeros(4, dtype=torch.int8),
                                     "m.scale": torch.rand(1)},
        }.get(case)
        if state is None:
            _gptq(str(d), i)
        else:
            save_file(state, str(d / "model.safetensors"))
        inputs.append(d)
    out = tmp_path / "out"
    proc = run_cli("average", *inputs, "-o", out)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines
    assert not out.exists() and leftovers(tmp_path) == []


def test_float8_widening_is_torchs_on_every_bit_pattern():
    """The float8 table decoded from the bit fields (no torch, no ml_dtypes) gives torch's
    value for all 256 patterns of each float8 type ckptavg reads (NaN patterns as NaN)."""
    from ckptavg.engine import arith
    from ckptavg.io import dtypes

    checked = []
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
        if not hasattr(torch, name) or dtypes.standard(name) is None:
            continue
        checked.append(name)
        table = arith._table(dtypes.standard(name), np.dtype(np.float64))
        want = torch.arange(256, dtype=torch.uint8).view(getattr(torch, name)).double().numpy()
        assert np.array_equal(table, want, equal_nan=True), name
    assert {"float8_e4m3fn", "float8_e5m2"} <= set(checked)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_compressed_tensors_own_rule_and_dequantization_agree(tmp_path, kind):
    """The real library: compressed-tensors' `calculate_qparams` gives, from the mean's
    ranges, the scales the output holds, and its `dequantize` of the output's codes with
    them is the float64 mean to within float8's rounding."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils import calculate_qparams

    paths, mean = _inputs(str(tmp_path), kind, shape=(256, 384))
    out = tmp_path / "avg.safetensors"
    run_cli("average", *paths, "-o", out, check=True)
    got = load_file(out)
    q, s = got["l.weight"], got[f"l.{SCALE[kind]}"]
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=kind,
                            **({"block_structure": [128, 128]} if kind == "block" else {}))
    m = mean.float()
    if kind == "tensor":
        lo, hi = m.min().reshape(1), m.max().reshape(1)
    elif kind == "channel":
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    else:
        blocks = m.reshape(2, 128, 3, 128)
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    scales, _ = calculate_qparams(lo, hi, args)
    torch.testing.assert_close(s.reshape(scales.shape), scales, rtol=1e-6, atol=0)
    back = dequantize(q, s if kind != "tensor" else s.reshape(()), args=args,
                      dtype=torch.float64)
    rel = float((back.double() - mean).norm() / mean.norm())
    assert rel < 0.04, rel


FORMATS = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]


def _hard_values(kind, seed: int) -> np.ndarray:
    """Random values over the whole float64 range (beyond float8's and float32's both ways),
    every midpoint between two float8 values and its float64 neighbours (where rounding
    twice to nearest would go wrong), the values themselves, signed zeros, float64's
    smallest subnormal, infinities and NaN."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    top = float(ml_dtypes.finfo(kind).max)
    values = np.unique(np.arange(256, dtype=np.uint8).view(kind).astype(np.float64))
    values = values[np.isfinite(values)]
    mids = (values[:-1] + values[1:]) / 2
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.standard_normal(100_000) * s for s in (1e-300, 1e-40, 1e-5, 1e-3, 1, 100,
                                                     top / 4, top, 1e10, 1e300)]
        + [mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf),
           np.nextafter(mids, -np.inf), values, -values,
           [top * 1.03, -top * 1.03, 5e-324, -5e-324, np.inf, -np.inf, np.nan, 0.0, -0.0]])


@pytest.mark.parametrize("name", FORMATS)
def test_rounding_to_float8_is_once_to_nearest_even_from_float64(name):
    """The engine's float64 -> float8 (`arith.encode_float8`: round to odd at 6 significant
    bits, then a table) is ml_dtypes' direct float64 rounding, bit for bit, on `_hard_values`
    (NaN codes compared as NaN-ness where a format has several); from float32 too."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from ckptavg.engine import arith
    from ckptavg.io import dtypes

    kind = getattr(ml_dtypes, name)
    x = _hard_values(kind, 3)
    with np.errstate(all="ignore"):
        want = x.astype(kind)
    got = np.empty(x.size, np.uint8)
    arith.encode_float8(got, x, name, np.empty(x.size, np.uint64))
    if dtypes.standard(name) is not None:  # as the engine rounds a mean (fnuz: torch files)
        assert np.array_equal(arith.round_once(x, dtypes.standard(name)), got)
    nan = np.isnan(want.astype(np.float64))
    assert np.array_equal(np.isnan(got.view(kind).astype(np.float64)), nan)
    assert np.array_equal(got[~nan], want.view(np.uint8)[~nan])
    assert np.array_equal(got[-2:], np.array([0x00, 0x80 if "fnuz" not in name else 0x00],
                                             np.uint8))  # the sign of zero kept (no -0: fnuz)
    f32 = x[np.abs(x) < 1e30].astype(np.float32)
    out = np.empty(f32.size, np.uint8)
    arith.encode_float8(out, f32, name, np.empty(f32.size, np.uint64))
    with np.errstate(all="ignore"):
        assert np.array_equal(out, f32.astype(kind).view(np.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_saturating_float8_rounding_is_clip_then_round(name):
    """What requantizing writes (`encode_float8(..., saturate=True)`) is the value clipped
    to the format's largest finite magnitude and then rounded by ml_dtypes: infinities and
    overflows give the largest code of their sign, NaN stays NaN."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from ckptavg.engine import arith

    kind = getattr(ml_dtypes, name)
    x = _hard_values(kind, 4)
    top = float(ml_dtypes.finfo(kind).max)
    out = np.empty(x.size, np.uint8)
    arith.encode_float8(out, x, name, np.empty(x.size, np.uint64), saturate=True)
    want = np.clip(x, -top, top).astype(kind)
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], want.view(np.uint8)[~nan])
    assert np.isnan(out[nan].view(kind).astype(np.float64)).all()
    assert (np.abs(out[np.isinf(x)].view(kind).astype(np.float64)) == top).all()


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                  "float8_e5m2fnuz"])
def test_each_float8_format_decodes_and_encodes_as_ml_dtypes_does(name):
    """Every float8 format taught in arith.FLOAT8, against ml_dtypes: the 256 values, and
    the codes of random values, midpoints, their neighbours, zeros of both signs and
    magnitudes past the largest finite one (infinity for e5m2, NaN for the others)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from ckptavg.engine import arith

    kind = getattr(ml_dtypes, name)
    ref = np.arange(256, dtype=np.uint8).view(kind).astype(np.float64)
    assert np.array_equal(arith._decode(name), ref, equal_nan=True)
    top = float(ml_dtypes.finfo(kind).max)
    values = np.unique(ref[np.isfinite(ref)])
    mids = (values[:-1] + values[1:]) / 2
    rng = np.random.default_rng(5)
    x = np.concatenate([np.clip(rng.standard_normal(50_000) * s, -top, top)
                        for s in (1e-6, 1e-2, 1, 100)]
                       + [mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), values,
                          [0.0, -0.0, 1.5 * top, -1.5 * top]])
    f32 = x.astype(np.float32)  # the midpoints and the values are float32s: kept exact
    out = np.empty(f32.size, np.uint8)
    arith._encode(out, f32, name)  # float32 -> float8, rounded once: what builds the tables
    assert np.array_equal(out, f32.astype(kind).view(np.uint8))



@pytest.mark.parametrize("name", FORMATS)
def test_float8_codes_widen_by_their_bits_to_their_values(name):
    """`arith.unscaled_float8` times `float8_unit` is each of the 256 codes' value, against
    ml_dtypes (NaN as NaN, e5m2's infinities), in any order and repeated; and the codes it
    looks up (`_SPECIAL`) are exactly the ones that are not finite numbers."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from ckptavg.engine import arith

    kind = getattr(ml_dtypes, name)
    codes = np.concatenate([np.arange(256), np.random.default_rng(0).integers(0, 256, 5000)]
                           ).astype(np.uint8)
    got = np.empty(codes.size)
    arith.unscaled_float8(got, codes, name, np.empty(codes.size, np.int32))
    got *= arith.float8_unit(name)
    want = codes.view(kind).astype(np.float64)
    assert np.array_equal(got, want, equal_nan=True)
    mask, value = arith._SPECIAL[name]
    special = (np.arange(256) & mask) == value
    assert np.array_equal(special, ~np.isfinite(want[:256]))


def test_into_a_quantized_running_average_is_refused(tmp_path):
    """--into promises the average of every input folded so far, exactly; an FP8 running
    average would be requantized at each fold and drift from it: one line, exit 2, the
    running average untouched."""
    paths, _ = _inputs(str(tmp_path), "tensor")
    run = tmp_path / "run.safetensors"
    assert run_cli("average", *paths[:2], "-o", run).returncode == 0
    before = run.read_bytes()
    proc = run_cli("average", paths[2], "--into", run)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--into" in lines[0] and "FP8" in lines[0], proc.stderr
    assert run.read_bytes() == before and leftovers(tmp_path) == []
