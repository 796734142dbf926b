"""Hugging Face: save_pretrained folders and Trainer checkpoint-STEP folders in,
from_pretrained on the output."""

from __future__ import annotations

import json

import pytest
import torch

from tests.interop.conftest import assert_matches, cli_ok, float64_mean

transformers = pytest.importorskip("transformers")


def _tiny(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)  # lm_head is tied to the token embedding


def _checkpoints(root, safe=True, n=3):
    folders = []
    for i in range(n):
        step = 100 * (i + 1)
        d = root / f"checkpoint-{step}"
        _tiny(i).save_pretrained(d, safe_serialization=safe)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": i + 1}))
        folders.append(d)
    return folders


def _weights(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_trainer_folders_average_into_a_folder_from_pretrained_loads(tmp_path, safe):
    folders = _checkpoints(tmp_path, safe)
    plan = json.loads(cli_ok("average", *folders, "--from-step", 200, "--dry-run", "--json"))
    assert plan["steps"] == [200, 300] and plan["epochs"] == [2, 3]
    out = tmp_path / "swa"
    cli_ok("average", *folders, "--from-step", 200, "-o", out)
    assert (out / "config.json").read_bytes() == (folders[-1] / "config.json").read_bytes()
    got = _weights(out)
    assert_matches(got, float64_mean([_weights(f) for f in folders[1:]]))
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()
    # again into the same folder: an earlier output of ours (with its config.json) is replaced
    cli_ok("average", *folders, "-o", out)
    assert_matches(_weights(out), float64_mean([_weights(f) for f in folders]))


def test_a_bin_output_is_a_plain_state_dict(tmp_path):
    folders = _checkpoints(tmp_path, safe=True)
    out = tmp_path / "swa"
    out.mkdir()
    (out / "config.json").write_bytes((folders[0] / "config.json").read_bytes())
    cli_ok("average", *folders, "-o", out / "pytorch_model.bin")
    raw = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in raw.values())  # no wrapper, no metadata
    assert_matches(_weights(out), float64_mean([_weights(f) for f in folders]))


def test_differing_config_files_are_reported(tmp_path):
    folders = _checkpoints(tmp_path, safe=True, n=2)
    cfg = json.loads((folders[1] / "config.json").read_text())
    cfg["summary_type"] = "mean"
    (folders[1] / "config.json").write_text(json.dumps(cfg))
    proc_out = cli_ok("average", *folders, "-o", tmp_path / "swa", "--json")
    warnings = json.loads(proc_out)["warnings"]
    assert any("config.json differs" in w for w in warnings)
