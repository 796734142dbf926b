"""timm: CheckpointSaver files (with ModelEmaV3 weights) in, create_model(checkpoint_path=)
on the output."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.interop.conftest import assert_matches, cli_ok, float64_mean

timm = pytest.importorskip("timm")
from timm.utils import CheckpointSaver, ModelEmaV3  # noqa: E402

ARCH = "test_resnet"


def _run(folder, epochs=4):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=3)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = CheckpointSaver(model, opt, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=epochs)
    for epoch in range(epochs):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        saver.save_checkpoint(epoch, metric=float(epoch % 3))
    return sorted(folder.glob("checkpoint-*.pth.tar"), key=lambda p: int(p.name.split("-")[1].split(".")[0]))


def test_last_and_best_are_copies_and_refused(tmp_path):
    _run(tmp_path)
    files = sorted(tmp_path.glob("*.pth.tar"))
    assert {"last.pth.tar", "model_best.pth.tar"} <= {f.name for f in files}
    proc = run_cli("average", *files, "-o", tmp_path / "avg.pth")
    assert proc.returncode == 1 and "counted twice" in proc.stderr
    assert not (tmp_path / "avg.pth").exists()


def test_ema_weights_average_and_timm_loads_them(tmp_path):
    files = _run(tmp_path)
    plan = json.loads(cli_ok("average", *files, "--key", "state_dict_ema", "--dry-run", "--json"))
    assert plan["epochs"] == [0, 1, 2, 3]
    assert set(plan["epoch_sources"]) == {"checkpoint entry 'epoch'"}
    out = tmp_path / "avg.pth"
    cli_ok("average", *files, "--key", "state_dict_ema", "--from-epoch", 1, "-o", out)
    model = timm.create_model(ARCH, num_classes=3, checkpoint_path=str(out))
    want = float64_mean([torch.load(f, weights_only=False)["state_dict_ema"] for f in files[1:]])
    assert_matches(model.state_dict(), want)


def test_files_with_args_average_without_torch_into_a_pth_timm_and_torch_load(tmp_path):
    """timm's train.py saves `args` (an argparse.Namespace) beside the weights: the files are
    still read without importing torch, the .pth.tar output is written without it, loads
    with torch's default weights_only=True, and timm builds the model from it."""
    import argparse
    import subprocess
    import sys

    from tests.conftest import ROOT

    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model=ARCH, lr=0.1, epochs=3)
    saver = CheckpointSaver(model, opt, args=args, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=3)
    for epoch in range(3):
        loss = model(torch.randn(2, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        saver.save_checkpoint(epoch, metric=float(epoch))
    files = sorted(tmp_path.glob("checkpoint-*.pth.tar"))
    assert len(files) == 3 and "args" in torch.load(files[0], weights_only=False)
    out = tmp_path / "avg.pth.tar"
    script = ("import sys\nimport ckptavg\nr = ckptavg.average(sys.argv[2:], sys.argv[1])\n"
              "print('torch' in sys.modules)\nprint(len(r.warnings))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *map(str, files)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["False", "1"], proc.stderr
    raw = torch.load(out)  # torch's default settings: weights_only=True
    assert raw["args"] == {"model": ARCH, "lr": 0.1, "epochs": 3}
    built = timm.create_model(ARCH, num_classes=3, checkpoint_path=str(out))
    want = float64_mean([torch.load(f, weights_only=False)["state_dict"] for f in files])
    assert_matches(built.state_dict(), want)


def test_the_users_kwargs_win_over_the_data_and_mistakes_are_one_line(monkeypatch):
    """#35: --model-kwargs '{"in_chans": 1}' is not replaced by the data's channel count; an
    unknown kwarg names --model-kwargs; pretrained with no network says so in one line."""
    from ckptavg.errors import ModelError, OptionError
    from ckptavg.nn.models import create_model

    net = create_model(f"timm:{ARCH}", supplied={"num_classes": 10, "in_channels": 3},
                       in_chans=1)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    assert net.get_classifier().out_features == 10  # inferred, where the user gave none
    net = create_model(f"timm:{ARCH}", supplied={"num_classes": None, "in_channels": None})
    assert net.get_classifier().out_features == timm.create_model(ARCH).get_classifier() \
        .out_features  # unknown: timm's own default, not a guess
    with pytest.raises(OptionError, match="model_kwargs .*bogus") as e:
        create_model(f"timm:{ARCH}", bogus=1)
    assert e.value.options == ("model_kwargs",)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # read by the hub at import, which came first: without it each file is retried with
    # backoff (46 s here) before the same failure
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="pretrained=True downloads weights, and the download "
                       "failed .*drop pretrained"):
        create_model("timm:resnet18", pretrained=True)
