"""The old spellings of renamed options (issue #25): each still does what it did, with one
warning naming the new flag; both spellings at once is a usage error; `--help` shows only
the new one. Checked against what the new spelling does on the same files."""

from __future__ import annotations

import json

import pytest
import torch

import ckptavg
from ckptavg.cli import main
from tests.conftest import write_safetensors


def _run(capsys, args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_old_threads_spelling_of_average_warns_and_averages(capsys, tmp_path):
    paths = write_safetensors(tmp_path, 3)
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    code, _, err = _run(capsys, ["average", *paths, "-o", new, "--arith-threads", 1, "-q"])
    assert code == 0 and err == ""
    code, _, err = _run(capsys, ["average", *paths, "-o", old, "--threads", 1, "-q"])
    assert code == 0
    assert err.strip() == ("ckptavg: warning: --threads is deprecated (since 0.2) and goes in "
                           "the next release; use --arith-threads")
    a, b = ckptavg.load(new)[0], ckptavg.load(old)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_both_spellings_at_once_is_a_usage_error(capsys, tmp_path):
    paths = write_safetensors(tmp_path, 2)
    code, out, err = _run(capsys, ["average", *paths, "-o", tmp_path / "o.safetensors",
                                   "--threads", 1, "--arith-threads", 2, "--json"])
    assert code == 2 and "--threads and --arith-threads are one option" in err
    assert json.loads(out)["exit_code"] == 2
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("command,old,new", [
    ("average", "--threads", "--arith-threads"), ("train", "--threads", "--torch-threads"),
    ("train", "--subset", "--train-images"), ("train", "--out", "--output"),
    ("eval", "--subset", "--eval-images"), ("ensemble", "--subset", "--eval-images"),
    ("bn-fix", "--subset", "--bn-images"), ("soup", "--subset", "--train-images"),
    ("search", "--subset", "--train-images"), ("width", "--train-subset", "--train-images"),
    ("width", "--test-subset", "--eval-images"), ("demo", "--out", "--output"),
    ("replicate", "--out", "--output"), ("replicate", "--subset", "--train-images"),
])
def test_help_shows_the_new_spelling_only(command, old, new):
    from ckptavg.cli import cli

    params = [p for p in cli.commands[command].params if hasattr(p, "hidden")]
    shown = {o for p in params if not p.hidden for o in p.opts}
    hidden = {o for p in params if p.hidden for o in p.opts}
    assert new in shown and old not in shown and old in hidden


def test_old_subset_of_bn_fix_uses_that_many_images(capsys, tmp_path):
    from tests.fakedata import tiny_bn, write_mnist

    data = tmp_path / "data"
    write_mnist(str(data), n_train=64, n_test=8)
    ckpt = tmp_path / "m.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ckpt, {"bn.stale": "true"})
    common = ["--model", "tests.fakedata:tiny_bn", "--data", "fashion-mnist", "--data-dir", data,
              "--batch-size", 8, "--json"]
    code, out, err = _run(capsys, ["bn-fix", ckpt, "-o", tmp_path / "a.safetensors", *common,
                                   "--subset", 24])
    assert code == 0 and "--subset is deprecated" in err and "use --bn-images" in err
    assert json.loads(out)["samples"] == 24
    code, out, err = _run(capsys, ["bn-fix", ckpt, "-o", tmp_path / "b.safetensors", *common,
                                   "--bn-images", 24])
    assert code == 0 and "deprecated" not in err and json.loads(out)["samples"] == 24
