"""MXFP4 checkpoints (gpt-oss's experts) averaged in what their weights mean (issue #36).

Every input is dequantized here by transformers' own MXFP4 code (`convert_moe_packed_tensors`,
what `from_pretrained` runs on gpt-oss weights) when it is installed, else by the OCP table
written out in this file, and averaged in float64; the output's blocks and scales are
checked against the OCP rule applied to that mean, computed here with torch."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg
from tests.conftest import average_without_torch, leftovers, run_cli

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
KEY = "model.layers.0.mlp.experts.gate_up_proj"
SHAPE = (2, 6, 3)  # experts, rows, blocks of 32 values per row


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] uint8 codes and [..., G] e8m0 exponents -> [..., G, 32] float64."""
    lo, hi = FP4[(blocks & 0x0F).long()], FP4[(blocks >> 4).long()]
    values = torch.stack([lo, hi], dim=-1).reshape(*blocks.shape[:-1], 32)
    return torch.ldexp(values, (scales.long() - 127).unsqueeze(-1).double())


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OCP rule, written here with torch: exponent floor(log2(amax)) - 2, codes the
    nearest FP4 values (ties to the even code, beyond 6 saturated)."""
    amax = values.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))) - 2,
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    q = values / torch.exp2(exp).unsqueeze(-1)
    grid = FP4[:8]
    dist = (q.abs().unsqueeze(-1) - grid).abs()  # [..., 32, 8]
    best = dist.min(-1, keepdim=True).values
    # the nearest grid value; of two equally near, the even code
    candidates = torch.where(dist == best, torch.arange(8), torch.full_like(dist, 99).long())
    even = torch.where(candidates % 2 == 0, candidates, torch.full_like(candidates, 99))
    code = torch.where(even.amin(-1) < 99, even.amin(-1), candidates.amin(-1))
    code = torch.where(q.abs() > 6, torch.full_like(code, 7), code)
    code = code | (torch.signbit(q).long() << 3)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


def transformers_dequantize(blocks, scales):
    """transformers' own MXFP4 dequantization (gpt-oss: it also transposes the last two
    axes of the [experts, rows, values] result), undone back to [..., G, 32]."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    out = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    e, r, g = blocks.shape[:3]
    return out.transpose(1, 2).reshape(e, r, g, 32).double()


def _inputs(tmp_path, n=3, folder=True, seed=0):
    """n gpt-oss-like checkpoints: MXFP4 experts with unequal scales (the i-th input's
    weights 4^i times larger, so exponents differ), a bf16 router, config.json saying mxfp4."""
    g = torch.Generator().manual_seed(seed)
    paths, values = [], []
    for i in range(n):
        w = torch.randn(*SHAPE, 32, generator=g, dtype=torch.float64) * 4.0 ** i
        w[0, 0, 0] = 0.0  # a block of zeros
        blocks, scales = quantize(w)
        state = {f"{KEY}_blocks": blocks, f"{KEY}_scales": scales,
                 "model.layers.0.mlp.router.weight": torch.randn(4, 8, generator=g).bfloat16()}
        if folder:
            d = tmp_path / f"checkpoint-{100 * (i + 1)}"
            d.mkdir()
            save_file(state, str(d / "model.safetensors"))
            (d / "config.json").write_text(json.dumps(
                {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}))
            paths.append(d)
        else:
            paths.append(tmp_path / f"step-{i + 1}.safetensors")
            save_file(state, str(paths[-1]))
        values.append(dequantize(blocks, scales))
    mean = values[0]
    for v in values[1:]:
        mean = mean + v
    return paths, mean / n


def test_the_reference_dequantization_is_transformers_own():
    blocks, scales = quantize(torch.randn(*SHAPE, 32, dtype=torch.float64) * 3)
    assert torch.equal(transformers_dequantize(blocks, scales), dequantize(blocks, scales))


def test_mxfp4_output_is_the_ocp_requantization_of_the_float64_mean(tmp_path):
    paths, mean = _inputs(tmp_path)
    out = tmp_path / "avg"
    proc = run_cli("average", *paths, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() \
        else ckptavg.load(out)[0]
    blocks, scales = got[f"{KEY}_blocks"], got[f"{KEY}_scales"]
    assert blocks.dtype == torch.uint8 and blocks.shape == (*SHAPE, 16)
    want_blocks, want_scales = quantize(mean)
    assert torch.equal(scales, want_scales)  # floor(log2(amax)) - 2 of the mean, per block
    assert torch.equal(blocks, want_blocks)  # each code the nearest FP4 value, ties even
    assert int(scales[0, 0, 0]) == 0 or mean[0, 0, 0].abs().max() > 0
    # read back by transformers: within half FP4's widest step (2 between 4 and 6) of the
    # mean, or saturated at 6 (the OCP rule's exponent leaves values up to 8 x 2^e): at most
    # 2 x 2^e either way
    back = transformers_dequantize(blocks, scales)
    assert bool(((back - mean).abs() <= 2 * torch.exp2(scales.double() - 127)
                 .unsqueeze(-1)).all())
    rel = float((back - mean).norm() / mean.norm())
    assert rel < 0.15  # FP4's own rounding; codes and scales averaged apart are far off
    meta = json.loads(run_cli("inspect", out, "--json").stdout)
    assert "mxfp4" in meta["metadata"]["average.quantized"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        {"quant_method": "mxfp4"}
    router = [load_file(str(p / "model.safetensors"))["model.layers.0.mlp.router.weight"]
              for p in paths]
    assert torch.equal(got["model.layers.0.mlp.router.weight"],
                       (sum(r.double() for r in router) / 3).bfloat16())


def test_mxfp4_files_average_without_torch_and_verify(tmp_path):
    paths, mean = _inputs(tmp_path, folder=False)
    out = tmp_path / "avg.safetensors"
    assert average_without_torch(paths, out) == ["0", "False"]
    got = load_file(str(out))
    assert torch.equal(got[f"{KEY}_blocks"], quantize(mean)[0])
    assert ckptavg.verify(out).status == "verified"
    info = ckptavg.inspect(paths[0])
    assert info.quantization.averaged and "mxfp4" in info.quantization.scheme


def test_weights_apply_to_what_each_mxfp4_input_means(tmp_path):
    paths, _ = _inputs(tmp_path, folder=False, seed=3)
    values = [dequantize(*(load_file(str(p))[f"{KEY}_{s}"] for s in ("blocks", "scales")))
              for p in paths]
    ws = [1.0, 2.5, 0.5]
    want = values[0] * (ws[0] / sum(ws))
    for v, w in zip(values[1:], ws[1:]):
        want = want + v * (w / sum(ws))
    out = tmp_path / "avg.safetensors"
    r = ckptavg.average(paths, out, weights=ws)
    assert r.n == 3
    got = load_file(str(out))
    back = dequantize(got[f"{KEY}_blocks"], got[f"{KEY}_scales"])
    want_blocks, want_scales = quantize(want)
    assert torch.equal(got[f"{KEY}_scales"], want_scales)
    # the weighted mean is summed as the engine sums it (w_i x_i, then / sum w): codes may
    # differ from this reference's only where a value is within a rounding of a midpoint
    assert (got[f"{KEY}_blocks"] != want_blocks).float().mean() < 0.01
    assert bool(((back - want).abs() <= 2 * torch.exp2(want_scales.double() - 127)
                 .unsqueeze(-1)).all())


def test_dtype_is_refused_for_mxfp4_in_one_line(tmp_path):
    paths, _ = _inputs(tmp_path, folder=False, n=2)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "-o", out, "--dtype", "bfloat16")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MXFP4" in lines[0] and "--dtype" in lines[0], proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_malformed_mxfp4_blocks_are_refused(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"s{i}.safetensors")
        save_file({"e.down_blocks": torch.full((4, 16), i, dtype=torch.uint8),
                   "e.down_scales": torch.zeros(4, 1, dtype=torch.uint8)}, str(paths[-1]))
    proc = run_cli("average", *paths, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and "no mxfp4 layout" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_a_rank_that_writes_the_scales_without_the_blocks_makes_the_same_scales(tmp_path):
    """Under torchrun the tensors are shared out by bytes, so the blocks and their scales
    may fall to two ranks: the rank with the scales alone derives them in a pass of its own
    (engine/fp8.Fp8Run._mx_scales), the same bytes as from the blocks' pass, and hashes
    only the scales' bytes."""
    import numpy as np

    from ckptavg.engine.content import ContentHashes
    from ckptavg.engine.kernel import execute
    from ckptavg.engine.plan import make_plan
    from ckptavg.io import open_checkpoint
    from ckptavg.io.writer import Discard

    class Keep(Discard):
        def __init__(self):
            self.got = {}

        def _write(self, key, tensor):
            self.got[key] = np.array(tensor)

        def _write_part(self, key, flat, first, last):
            self.got[key] = np.concatenate([self.got[key], flat]) if not first else np.array(flat)

    paths, mean = _inputs(tmp_path, folder=False)
    readers = [open_checkpoint(str(p)) for p in paths]
    try:
        plan = make_plan(readers, [1.0] * 3)
        whole, alone = Keep(), Keep()
        execute(plan, whole)
        hashes = ContentHashes.of_plan(plan)
        execute(plan, alone, keys=[f"{KEY}_scales"], hashes=hashes)
    finally:
        for r in readers:
            r.close()
    assert list(alone.got) == [f"{KEY}_scales"]
    assert np.array_equal(alone.got[f"{KEY}_scales"], whole.got[f"{KEY}_scales"])
    assert np.array_equal(whole.got[f"{KEY}_scales"], quantize(mean)[1].numpy().reshape(-1))
    recorded = hashes.record([f"{KEY}_scales"])
    assert all(f"{KEY}_scales" in recorded[str(i)] for i in range(3))


def test_fp4_rounding_is_ml_dtypes_on_hard_values():
    """MXFP4's element rounding (`arith.encode_float8` with FP4's table, saturating) against
    ml_dtypes' float4_e2m1fn of the clipped value: random values, every midpoint between
    two FP4 values and its float64 neighbours, signed zeros, magnitudes far past 6 and below
    the smallest step."""
    import numpy as np

    ml_dtypes = pytest.importorskip("ml_dtypes")
    if not hasattr(ml_dtypes, "float4_e2m1fn"):
        pytest.skip("ml_dtypes without float4_e2m1fn")
    from ckptavg.engine import arith

    kind = ml_dtypes.float4_e2m1fn
    grid = np.unique(np.abs(np.arange(16, dtype=np.uint8).view(kind).astype(np.float64)))
    mids = (grid[:-1] + grid[1:]) / 2
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000) * s for s in (0.1, 1, 3, 10)]
                       + [mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 9),
                          np.nextafter(-mids, -9), grid, -grid,
                          [0.0, -0.0, 1e300, -1e300, 5e-324, -5e-324]])
    out = np.empty(x.size, np.uint8)
    arith.encode_float8(out, x, "float4_e2m1fn", np.empty(x.size, np.uint64), saturate=True)
    assert np.array_equal(out, np.clip(x, -6, 6).astype(kind).view(np.uint8))


@pytest.mark.parametrize("says,holds", [("mxfp4", "fp8"), ("fp8", "mxfp4")])
def test_a_config_naming_the_other_scheme_than_the_tensors_is_refused(tmp_path, says, holds):
    """A config.json that names MXFP4 over FP8 tensors (or the other way) says something the
    tensors do not: refused in one line, nothing written."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        d = tmp_path / f"c{i}"
        d.mkdir()
        if holds == "fp8":
            state = {"l.weight": (torch.randn(8, 8, generator=g) * 10).to(torch.float8_e4m3fn),
                     "l.weight_scale": torch.rand(1, generator=g)}
        else:
            blocks, scales = quantize(torch.randn(*SHAPE, 32, generator=g, dtype=torch.float64))
            state = {f"{KEY}_blocks": blocks, f"{KEY}_scales": scales}
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": says}}))
        paths.append(d)
    proc = run_cli("average", *paths, "-o", tmp_path / "out")
    assert proc.returncode == 1 and f"quantized checkpoint ({says}" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["soup", "search", "swag"])
def test_choices_and_swag_refuse_quantized_inputs(tmp_path, command):
    """soup and search sum checkpoints in float64 running sums, SWAG their moments: over
    MXFP4 (or FP8) files they would sum codes apart from their scales, so they refuse them
    in one line before anything is scored or written."""
    paths, _ = _inputs(tmp_path, folder=False)
    out = tmp_path / "out.safetensors"
    args = {"soup": ["soup", *paths, "-o", out, "--holdout", "10", "--model", "tests.fakedata:linear2"],
            "search": ["search", *paths, "-o", out, "--holdout", "10",
                       "--model", "tests.fakedata:linear2"],
            "swag": ["swag", *paths, "-o", out]}[command]
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantized checkpoint (mxfp4" in lines[0], proc.stderr
    assert "dequantize" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
