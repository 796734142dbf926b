"""A single-file output never replaces a file of the user's (issue #34, items 4 and 7): only
an earlier output of ckptavg is replaced, or any file with --overwrite; running the same
command again gives the same result as the first run."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.conftest import run_cli


def _users_loop(folder, n=5):
    """A plain PyTorch loop's files: runs/epoch_NNN.pt with optimizer state and loss."""
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        p = folder / f"epoch_{i:03d}.pt"
        torch.save({"epoch": i, "model_state_dict": {"w": torch.full((4,), float(i))},
                    "optimizer_state_dict": {"state": {}, "param_groups": []}, "loss": 1.0 / i},
                   p)
        paths.append(p)
    return paths


def _digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_average_does_not_replace_a_users_checkpoint(tmp_path, suffix):
    paths = _users_loop(tmp_path / "runs")
    theirs = tmp_path / "runs3" / f"epoch_010{suffix}"
    theirs.parent.mkdir()
    if suffix == ".pt":
        torch.save({"epoch": 10, "model_state_dict": {"w": torch.zeros(4)}}, theirs)
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(4)}, str(theirs))
    before = _digest(theirs)
    proc = run_cli("average", *paths, "-o", theirs)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an output of ckptavg" in lines[0] and "--overwrite" in lines[0]
    assert _digest(theirs) == before
    proc = run_cli("average", *paths, "-o", theirs, "--overwrite")
    assert proc.returncode == 0, proc.stderr


def test_bn_fix_does_not_replace_a_users_checkpoint(tmp_path):
    import ckptavg
    from tests.fakedata import tiny_bn, write_mnist

    data = tmp_path / "data"
    write_mnist(str(data), n_train=16, n_test=8)
    ck = tmp_path / "swa.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ck, {"data.name": "fashion-mnist", "bn.stale": "true",
                                              "average.n": "2"})
    theirs = tmp_path / "epoch_001.pt"
    torch.save({"epoch": 1, "model_state_dict": tiny_bn().state_dict(), "loss": 0.5}, theirs)
    before = _digest(theirs)
    args = ["bn-fix", ck, "--data-dir", data, "--model", "tests.fakedata:tiny_bn", "-o", theirs]
    proc = run_cli(*args)
    assert proc.returncode == 1 and "not an output of ckptavg" in proc.stderr, proc.stderr
    assert _digest(theirs) == before
    # an earlier output of ckptavg (a bn-fix output) is replaced without the flag
    ours = tmp_path / "fixed.pt"
    assert run_cli(*args[:-1], ours).returncode == 0
    proc = run_cli(*args[:-1], ours)
    assert proc.returncode == 0, proc.stderr


def test_running_the_same_command_again_gives_the_same_result(tmp_path):
    _users_loop(tmp_path / "runs2")
    glob = str(tmp_path / "runs2" / "*.pt")
    out = tmp_path / "runs2" / "swa.pt"  # caught by the glob on the second run
    first = run_cli("average", glob, "-o", out)
    assert first.returncode == 0, first.stderr
    got1 = torch.load(out, weights_only=True)["model_state_dict"]
    second = run_cli("average", glob, "-o", out)
    assert second.returncode == 0, second.stderr
    assert "an output of ckptavg" in second.stderr  # the earlier swa.pt, left out
    got2 = torch.load(out, weights_only=True)["model_state_dict"]
    assert got1.keys() == got2.keys() and all(torch.equal(got1[k], got2[k]) for k in got1)
    assert torch.equal(got2["w"], torch.full((4,), 3.0))
