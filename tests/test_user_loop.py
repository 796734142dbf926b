"""A new user's own training loop, walked through the CLI as real subprocesses: a tiny
BatchNorm CNN in their module, checkpoints saved as {'epoch', 'model_state_dict',
'optimizer_state_dict'}, their own data functions. The silent wrong answers of issue #28
are each a check here, against values computed in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

MODULE = '''
import torch

def build(num_classes=10, in_channels=1):
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))

def build_any(**kwargs):  # a factory that takes **kwargs, as timm's do
    return build(**kwargs)

def _images(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 12, 12, generator=g), i % 10) for i in range(n)]

def loader():            # no split: the same images whatever is asked
    return _images(0, 40)

def data(split="train"):  # tells splits apart
    return _images(0 if split == "train" else 1, 40 if split == "train" else 20)

def as_loader(split="train"):
    return torch.utils.data.DataLoader(data(split), batch_size=8)
'''


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)


def one_line(proc, rc, *needles):
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def user(tmp_path):
    """The user's folder: mymodule.py and runs/epoch-N.pt from their own loop."""
    return make_user(tmp_path)


def make_user(tmp_path):
    (tmp_path / "mymodule.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodule
        torch.manual_seed(0)
        net = mymodule.build()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        (tmp_path / "runs").mkdir()
        for epoch in range(1, 5):
            for x, y in torch.utils.data.DataLoader(mymodule.data(), batch_size=8):
                loss = torch.nn.functional.cross_entropy(net(x), torch.as_tensor(y))
                opt.zero_grad()
                loss.backward()
                opt.step()
            torch.save({"epoch": epoch, "model_state_dict": net.state_dict(),
                        "optimizer_state_dict": opt.state_dict()},
                       tmp_path / "runs" / f"epoch-{epoch}.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodule", None)
    return tmp_path


def _pt(folder):
    return sorted(str(p) for p in (folder / "runs").glob("epoch-*.pt"))


def test_an_earlier_average_caught_by_the_glob_is_left_out(user):
    one = cli(user, "average", *_pt(user), "--last", "3", "-o", "runs/swa.pt")
    assert one.returncode == 0, one.stderr
    got = torch.load(user / "runs" / "swa.pt")
    assert set(got) == {"model_state_dict", "metadata"}  # the inputs' entry name kept
    files = sorted(str(p) for p in (user / "runs").glob("*.pt"))  # as the shell expands it
    assert any(f.endswith("swa.pt") for f in files)
    plan = cli(user, "average", *files, "--last", "3", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    inputs = json.loads(plan.stdout)["inputs"]
    assert [os.path.basename(p) for p in inputs] == ["epoch-2.pt", "epoch-3.pt", "epoch-4.pt"]
    assert "swa.pt: an output of ckptavg (average.n=3)" in plan.stderr
    # and an epoch window no longer trips on it
    window = cli(user, "average", *files, "--from-epoch", "3", "--dry-run", "--json")
    assert window.returncode == 0, window.stderr
    assert len(json.loads(window.stdout)["inputs"]) == 2


def test_eval_will_not_call_a_splitless_functions_images_test(user):
    ck = _pt(user)[-1]
    proc = cli(user, "eval", ck, "--model", "mymodule:build", "--data", "mymodule:loader")
    one_line(proc, 2, "--data / --split", "mymodule:loader takes no `split` parameter")
    said = cli(user, "eval", ck, "--model", "mymodule:build", "--data", "mymodule:loader",
               "--split", "train", "--json")
    assert said.returncode == 0, said.stderr
    assert json.loads(said.stdout)["split"] == "train"
    told = cli(user, "eval", ck, "--model", "mymodule:build", "--data", "mymodule:data",
               "--json")
    assert told.returncode == 0, told.stderr
    assert json.loads(told.stdout)["split"] == "test" and json.loads(told.stdout)["samples"] == 20


def test_bn_fix_records_only_what_was_true_and_eval_warns_on_other_data(user):
    avg = user / "swa.safetensors"
    assert cli(user, "average", *_pt(user), "-o", avg).returncode == 0
    fixed = user / "fixed.safetensors"
    proc = cli(user, "bn-fix", avg, "--model", "mymodule:build", "--data", "mymodule:loader",
               "-o", fixed, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warnings" in json.loads(proc.stdout)
    from safetensors import safe_open

    with safe_open(str(fixed), "pt") as f:
        meta = f.metadata()
    assert meta["bn.data"] == "mymodule:loader"  # no split, no augmentation was asked of it
    other = cli(user, "eval", fixed, "--model", "mymodule:build", "--data", "mymodule:data",
                "--json")
    assert other.returncode == 0, other.stderr
    warnings = json.loads(other.stdout)["warnings"]
    assert any("computed on mymodule:loader (bn.data)" in w for w in warnings)
    assert "ckptavg: warning:" in other.stderr


def test_lightning_style_prefix_is_found_and_kwargs_reach_a_kwargs_factory(user):
    sd = torch.load(_pt(user)[-1])["model_state_dict"]
    prefixed = user / "lit.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, prefixed)
    proc = cli(user, "eval", prefixed, "--model", "mymodule:build", "--data", "mymodule:data",
               "--json")
    assert proc.returncode == 0, proc.stderr
    # a factory taking **kwargs gets the user's num_classes (the data says 10): 3 would not fit
    wrong = cli(user, "eval", _pt(user)[-1], "--model", "mymodule:build_any", "--model-kwargs",
                '{"num_classes": 3}', "--data", "mymodule:data")
    one_line(wrong, 1, "weights do not fit the model", "shape 5.weight [10, 4] vs [3, 4]")


def test_train_from_a_loader_function_refuses_and_leaves_no_folder(user):
    proc = cli(user, "train", "--data", "mymodule:as_loader", "--model", "mymodule:build",
               "--epochs", "1", "-o", "runs2")
    one_line(proc, 2, "--data mymodule:as_loader: returns a DataLoader")
    assert not (user / "runs2").exists()
    proc = cli(user, "train", "--data", "mymodule:loader", "--model", "mymodule:build",
               "--epochs", "1", "-o", "runs3")
    one_line(proc, 2, "takes no `split` parameter")
    assert not (user / "runs3").exists()


def test_search_on_images_ckptavg_cannot_know_were_held_out_says_so(user):
    out = user / "chosen.safetensors"
    proc = cli(user, "search", *_pt(user), "--model", "mymodule:build", "--data",
               "mymodule:data", "--holdout", "8", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert body["holdout_verified"] is False
    assert any("cannot know that the held-out images" in w for w in body["warnings"])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["select.holdout_verified"] == "false"


@pytest.mark.parametrize("case", ["both missing", "module.function", "not found", "dcp shard",
                                  "folder of .pt", "corrupt zip"])
def test_messages_name_the_fix(user, case):
    ck = _pt(user)[-1]
    if case == "both missing":
        proc = cli(user, "bn-fix", ck, "-o", "x.safetensors")
        one_line(proc, 2, "--model / --data: missing", "model.arch or data.name")
    elif case == "module.function":
        proc = cli(user, "eval", ck, "--model", "mymodule.build", "--data", "mymodule:data")
        one_line(proc, 2, "--model mymodule.build", "did you mean mymodule:build")
    elif case == "not found":
        proc = cli(user, "eval", ck, "--model", "nosuchmodule:build", "--data", "mymodule:data")
        one_line(proc, 2, "--model nosuchmodule:build", "looked up in the working folder")
    elif case == "dcp shard":
        (user / "step-1").mkdir()
        (user / "step-1" / "__0_0.distcp").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
        proc = cli(user, "inspect", "step-1/__0_0.distcp")
        one_line(proc, 1, "one file of a torch.distributed.checkpoint", "pass the folder, step-1/")
    elif case == "folder of .pt":
        proc = cli(user, "average", "runs", "-o", "x.safetensors")
        one_line(proc, 1, "'runs/*.pt'")
    else:
        raw = open(ck, "rb").read()
        (user / "cut.pt").write_bytes(raw[: len(raw) // 2])
        proc = cli(user, "inspect", "cut.pt")
        one_line(proc, 1, "truncated or damaged")
        assert "miniz" not in proc.stderr and "PytorchStreamReader" not in proc.stderr


def test_a_failed_download_takes_back_only_the_folders_it_made(tmp_path):
    from ckptavg.errors import DataError
    from ckptavg.nn.data import _download

    class FashionMNIST:  # torchvision keeps its files in ROOT/FashionMNIST/raw
        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "FashionMNIST", "raw"), exist_ok=True)
            raise OSError("no network")

    root = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="download to .* failed"):
        _download(FashionMNIST, "fashion-mnist", str(root), "train")
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's")
    with pytest.raises(DataError):
        _download(FashionMNIST, "fashion-mnist", str(kept), "train")
    assert sorted(os.listdir(kept)) == ["notes.txt"]
    assert (kept / "notes.txt").read_text() == "the user's"


def test_the_average_is_the_float64_mean(user):
    out = user / "avg.safetensors"
    assert cli(user, "average", *_pt(user), "-o", out).returncode == 0
    states = [torch.load(p)["model_state_dict"] for p in _pt(user)]
    got = load_file(out)
    for k, v in states[0].items():
        if v.is_floating_point():
            want = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
            assert torch.equal(got[k], want), k


def test_a_running_average_in_the_glob_is_the_into_target_not_an_input(user):
    """`average 'runs/*.pt' --into runs/swa.pt` from cron: the glob catches the running
    average itself; it is folded into, not averaged in, and no warning is given for it."""
    pts = _pt(user)
    first = cli(user, "average", *pts[:2], "-o", "runs/swa.pt")
    assert first.returncode == 0, first.stderr
    again = cli(user, "average", "runs/*.pt", "--into", "runs/swa.pt", "--json")
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["n"] == 4 and "swa.pt: an output of ckptavg" not in again.stderr
    states = [torch.load(p)["model_state_dict"] for p in pts]
    got = torch.load(user / "runs" / "swa.pt")["model_state_dict"]
    for k, v in states[0].items():
        if v.is_floating_point():
            want = (sum(s[k].double() for s in states) / 4).to(v.dtype)
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
