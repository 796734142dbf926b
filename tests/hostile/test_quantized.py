"""Quantized checkpoints are never averaged as codes (issue #36): FP8 and MXFP4 are averaged
in what their weights mean; every other layout ckptavg recognises, by its config.json or its
tensors, is refused in one line naming the scheme and the fix, with no output; layouts that only look alike (an int64 index beside a float scale,
float8 weights without scales) are averaged as before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import leftovers, run_cli


def _fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 10).to(torch.float8_e4m3fn)


def _layout(kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "compressed-tensors fp8":
        return {"layer.weight": _fp8((8, 8), seed), "layer.weight_scale": torch.rand(1, generator=g),
                "layer.input_scale": torch.rand(1, generator=g), "layer.bias": torch.randn(8, generator=g)}
    if kind == "deepseek fp8 block scales":
        return {"mlp.w.weight": _fp8((256, 256), seed),
                "mlp.w.weight_scale_inv": torch.rand(2, 2, generator=g)}
    if kind == "gptq":
        return {"q.qweight": torch.randint(0, 2**30, (4, 16), dtype=torch.int32, generator=g),
                "q.qzeros": torch.randint(0, 2**30, (1, 2), dtype=torch.int32, generator=g),
                "q.scales": torch.rand(1, 16, generator=g).half()}
    if kind == "bitsandbytes":
        return {"l.weight": torch.randint(0, 255, (32, 1), dtype=torch.uint8, generator=g),
                "l.weight.absmax": torch.rand(1, generator=g),
                "l.weight.quant_map": torch.rand(16, generator=g)}
    if kind == "mxfp4":
        return {"experts.gate_up_proj_blocks": torch.randint(0, 255, (4, 16), dtype=torch.uint8,
                                                             generator=g),
                "experts.gate_up_proj_scales": torch.randint(0, 255, (4,), dtype=torch.uint8,
                                                             generator=g)}
    if kind == "unknown codes beside a scale":
        return {"m.codes": torch.randint(-8, 8, (16,), dtype=torch.int8, generator=g),
                "m.scale": torch.rand(1, generator=g)}
    raise AssertionError(kind)


KINDS = ["gptq", "bitsandbytes", "unknown codes beside a scale"]
# averaged in value space: tests/test_fp8.py, tests/test_mxfp4.py
FP8_KINDS = ["compressed-tensors fp8", "deepseek fp8 block scales", "mxfp4"]
SCHEMES = {"compressed-tensors fp8": "fp8", "deepseek fp8 block scales": "fp8", "gptq": "gptq",
           "bitsandbytes": "bitsandbytes", "mxfp4": "mxfp4",
           "unknown codes beside a scale": "unknown scheme"}


def _run(tmp_path, kind: str) -> list:
    paths = []
    for i in range(3):
        p = tmp_path / f"ep-{i + 1}.safetensors"
        save_file(_layout(kind, i), str(p))
        paths.append(p)
    return paths


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_layout_is_refused_in_one_line(tmp_path, kind):
    paths = _run(tmp_path, kind)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), proc.stderr
    assert "quantized checkpoint" in lines[0] and SCHEMES[kind] in lines[0], lines[0]
    assert "dequantize" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    shown = run_cli("inspect", paths[0])
    assert shown.returncode == 0 and "quantized: " in shown.stdout, shown.stdout
    assert SCHEMES[kind] in shown.stdout
    info = json.loads(run_cli("inspect", paths[0], "--json").stdout)
    assert SCHEMES[kind] in info["quantization"]["scheme"]


@pytest.mark.parametrize("kind", FP8_KINDS)
def test_fp8_layouts_are_averaged_in_value_space_and_inspect_names_them(tmp_path, kind):
    paths = _run(tmp_path, kind)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "requantized" in json.loads(run_cli("inspect", out, "--json").stdout)[
        "metadata"]["average.quantized"]
    info = json.loads(run_cli("inspect", paths[0], "--json").stdout)
    assert SCHEMES[kind] in info["quantization"]["scheme"]
    assert info["quantization"]["averaged"] is True


def test_a_quantization_config_refuses_the_folder(tmp_path):
    """Two GPTQ folders (before: averaged into out/ in 0.1 s, exit 0)."""
    folders = []
    for i in range(2):
        f = tmp_path / f"step-{i + 1}"
        f.mkdir()
        save_file({"w": torch.randn(4, 4)}, str(f / "model.safetensors"))  # looks plain
        (f / "config.json").write_text(json.dumps(
            {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}))
        folders.append(f / "model.safetensors")
    proc = run_cli("average", *folders, "-o", tmp_path / "out")
    assert proc.returncode == 1 and "gptq" in proc.stderr and "config.json" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "out").exists()


def test_layouts_that_only_look_alike_are_averaged(tmp_path):
    """An int64 index buffer beside a float scale (Swin V2's attention) and float8 weights
    with no scales are not quantized: averaged as before (floats in float64, ints newest)."""
    states = []
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        s = {"attn.relative_position_index": torch.arange(9, dtype=torch.int64) + i,
             "attn.logit_scale": torch.rand(1, generator=g),
             "fc.weight": torch.randn(4, generator=g).to(torch.float8_e5m2)}
        p = tmp_path / f"e{i + 1}.safetensors"
        save_file(s, str(p))
        states.append(s)
        paths.append(p)
    out = tmp_path / "o.safetensors"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(out))
    assert torch.equal(got["attn.relative_position_index"], states[1]["attn.relative_position_index"])
    want = ((states[0]["attn.logit_scale"].double() + states[1]["attn.logit_scale"].double()) / 2)
    assert torch.equal(got["attn.logit_scale"], want.float())
