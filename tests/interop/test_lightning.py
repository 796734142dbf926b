"""Lightning: ModelCheckpoint files in, a .ckpt that load_from_checkpoint accepts out."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests.interop.conftest import assert_matches, cli_ok, float64_mean

L = pytest.importorskip("lightning")


@dataclass
class Cfg:  # a config object among the hyper-parameters: not on any allowlist
    width: int = 4


class Net(L.LightningModule):
    def __init__(self, width: int = 4, cfg: Cfg | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.ReLU(),
                                   nn.Linear(width, 2))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(folder, cfg=None):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=-1)
    trainer = L.Trainer(max_epochs=4, callbacks=[saver], logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(width=6, cfg=cfg), torch.utils.data.DataLoader(data, batch_size=16))
    return sorted(folder.glob("*.ckpt"))


def _state(path):
    return torch.load(path, weights_only=False)["state_dict"]


def test_lightning_checkpoints_average_into_a_loadable_ckpt(tmp_path):
    files = _fit(tmp_path / "ck")
    assert [f.name for f in files] == [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(4)]
    out = tmp_path / "swa.ckpt"
    plan = json.loads(cli_ok("average", *files, "--from-epoch", 2, "--dry-run", "--json"))
    assert plan["epochs"] == [2, 3] and plan["steps"] == [12, 16]  # not the step as epoch
    cli_ok("average", *files, "--from-epoch", 2, "-o", out)
    loaded = Net.load_from_checkpoint(out)  # Lightning's own loader, strict
    assert loaded.hparams.width == 6
    assert_matches(loaded.state_dict(), float64_mean([_state(f) for f in files[2:]]))
    raw = torch.load(out, weights_only=False)
    assert "optimizer_states" not in raw and "loops" not in raw and "callbacks" not in raw


def test_a_config_class_in_the_hyper_parameters_is_not_imported(tmp_path):
    files = _fit(tmp_path / "ck", cfg=Cfg(6))
    out = tmp_path / "swa.ckpt"
    cli_ok("average", *files, "-o", out)
    raw = torch.load(out, weights_only=True)  # nothing outside the allowlist was written
    # The config object is carried as a dict of its fields (never imported or called).
    assert raw["hyper_parameters"] == {"width": 6, "cfg": {"width": 6}}
    loaded = Net.load_from_checkpoint(out, width=6, cfg=Cfg(6))
    assert_matches(loaded.state_dict(), float64_mean([_state(f) for f in files]))


def test_inspect_says_where_the_weights_are(tmp_path):
    files = _fit(tmp_path / "ck")
    out = json.loads(cli_ok("inspect", files[-1], "--strip-prefix", "model.", "--json"))
    assert out["location"] == "state_dict" and out["removed_prefixes"] == ["model."]
    assert "optimizer_states" in out["other_entries"]


def test_lightning_checkpoints_are_averaged_without_importing_torch(tmp_path):
    """The files ModelCheckpoint writes (plain hyper-parameters) are described by the
    torch-free reader: a fresh interpreter averages them into safetensors without torch."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ckptavg.io.files import OpenFile
    from ckptavg.io.pt import read_structure

    files = _fit(tmp_path / "ck")
    for f in files:
        file, _ = OpenFile.of(str(f))
        try:
            assert read_structure(str(f), file) is not None, f
        finally:
            file.close()
    out = tmp_path / "swa.safetensors"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import sys\nfrom click.testing import CliRunner\nfrom ckptavg.cli import cli\n"
              f"r = CliRunner().invoke(cli, ['average', *{[str(f) for f in files]!r}, '-o', "
              f"{str(out)!r}, '-q'])\nprint(r.exit_code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True)
    assert proc.stdout.split() == ["0", "False"], proc.stderr
    assert_matches(load_file(out), float64_mean([_state(f) for f in files]))


def build(width: int = 6):
    """A user's factory: the network a `Net` holds as `self.model` (weights under `model.`)."""
    return Net(width=width).model


def data():
    """A user's data function: the images the BatchNorm pass reads (a TensorDataset)."""
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(64, 3, generator=g),
                                          torch.randint(0, 2, (64,), generator=g))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_bn_fix_of_a_lightning_file_loads_in_lightning_and_equals_update_bn(tmp_path, suffix):
    """Issue #35: `bn-fix` of a LightningModule's .ckpt with the user's factory and data, no
    --strip-prefix: the output is keyed as the input (`model.`), a .ckpt loads with
    `load_from_checkpoint`, and the statistics equal torch's `update_bn` on the same data."""
    from torch.optim.swa_utils import update_bn

    files = _fit(tmp_path / "ck")
    swa = tmp_path / "swa.ckpt"
    cli_ok("average", *files, "-o", swa)
    out = tmp_path / f"fixed{suffix}"
    cli_ok("bn-fix", swa, "--model", "tests.interop.test_lightning:build", "--data",
           "tests.interop.test_lightning:data", "--batch-size", "64", "-o", out)
    # the reference: the averaged weights in the user's own network, update_bn on the data
    ref = Net.load_from_checkpoint(swa)
    update_bn(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data().tensors[0]), batch_size=64), ref.model)
    want = ref.state_dict()
    if suffix == ".ckpt":
        got = Net.load_from_checkpoint(out).state_dict()  # Lightning's own loader, strict
    else:
        from safetensors.torch import load_file

        got = load_file(str(out))
    assert sorted(got) == sorted(want)  # model.*, as the input was keyed
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("command", ["soup", "search"])
def test_soup_and_search_of_lightning_files_write_a_ckpt_lightning_loads(tmp_path, command):
    """Issue #35: every command that writes keeps the input's layout: the chosen average of
    a LightningModule's .ckpt files (weights under `model.`, no flag) loads with
    `load_from_checkpoint`, and equals the float64 mean of the inputs it names."""
    files = _fit(tmp_path / "ck")
    out = tmp_path / f"{command}.ckpt"
    body = json.loads(cli_ok(command, *files, "--model", "tests.interop.test_lightning:build",
                             "--data", "tests.interop.test_lightning:data", "--holdout", "16",
                             "--train-images", "64", "-o", out, "--json"))
    named = body["chosen"] if command == "soup" else \
        [str(f) for f in files if body["best"]["start"] <= str(f) <= body["end"]]
    chosen = [f for f in files if str(f) in named]
    assert len(chosen) == body.get("best", {}).get("n", len(named)) >= 1, body
    from torch.optim.swa_utils import update_bn

    loaded = Net.load_from_checkpoint(out)  # Lightning's own loader, strict
    mean = float64_mean([_state(f) for f in chosen])
    # the reference: the mean in the user's network, update_bn on the 48 images trained on
    # (the first 64 less the 16 held out), one batch as the default batch size makes it
    ref = Net(width=6)
    ref.load_state_dict(mean)
    update_bn(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data().tensors[0][:48]), batch_size=128), ref.model)
    want, got = ref.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any("running_mean" in k and not torch.allclose(mean[k], want[k]) for k in want)
