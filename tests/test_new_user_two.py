"""Issue #34, a new user's loop tried a second time: each silent choice between the commands is
a check here, through the CLI as a real subprocess, against values computed in the test."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.test_user_loop import _pt, cli, make_user, one_line

MORE = '''

def missing(split="train"):
    return open("/nonexistent/fmnist.npz", "rb")

def bad_factory(num_classes=10):
    raise ValueError("my factory is broken")

def tiny(split="train"):  # 2x2 images: smaller than the 3x3 kernel, the forward pass fails
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 2, 2, generator=g), i % 10) for i in range(16)]

def build4(num_classes=4, in_channels=1):
    return build(num_classes, in_channels)

def four(split="train"):  # labels 0..3, no `classes`: the class count is not known
    return torch.utils.data.TensorDataset(torch.randn(16, 1, 12, 12),
                                          torch.arange(16) % 4)
'''


@pytest.fixture
def user(tmp_path):
    """The user's folder: mymodule.py and runs/epoch-N.pt from their own loop."""
    folder = make_user(tmp_path)
    with open(folder / "mymodule.py", "a") as f:
        f.write(MORE)
    return folder


def _bare(user, name, epoch_file):
    """A file with the weights alone: no epoch entry, no number in its name."""
    state = torch.load(epoch_file)["model_state_dict"]
    torch.save(state, user / "runs" / name)
    return str(user / "runs" / name)


# 1. Asking for more images than exist is an error naming the option and the count there is.

def test_more_training_images_than_exist_is_refused_not_clamped(user):
    # mymodule:data's train split has 40 images
    for cmd in ("soup", "search"):
        proc = cli(user, cmd, *_pt(user), "--train-images", "50", "--holdout", "10",
                   "--model", "mymodule:build", "--data", "mymodule:data",
                   "-o", f"{cmd}.safetensors")
        one_line(proc, 2, "--train-images 50", "more images than the training split has (40)")
        assert not (user / f"{cmd}.safetensors").exists()
    ok = cli(user, "search", *_pt(user), "--train-images", "40", "--holdout", "10", "--model",
             "mymodule:build", "--data", "mymodule:data", "-o", "s.safetensors", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["holdout"] == "mymodule:data:train[30:40]"


def test_more_eval_or_bn_images_than_exist_is_refused(user):
    ck = _pt(user)[-1]
    proc = cli(user, "eval", ck, "--model", "mymodule:build", "--data", "mymodule:data",
               "--eval-images", "21")
    one_line(proc, 2, "--eval-images 21", "(20)")
    proc = cli(user, "bn-fix", ck, "--model", "mymodule:build", "--data", "mymodule:data",
               "--bn-images", "41", "-o", "fixed.safetensors")
    one_line(proc, 2, "--bn-images 41", "(40)")
    assert not (user / "fixed.safetensors").exists()
    ok = cli(user, "eval", ck, "--model", "mymodule:build", "--data", "mymodule:data",
             "--eval-images", "20", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["samples"] == 20, ok.stderr


# 2. Options whose result depends on order need known positions, or --given-order.

def test_order_dependent_options_need_positions_or_given_order(user):
    pts = _pt(user)
    b = _bare(user, "beta.pt", pts[0])
    a = _bare(user, "alpha.pt", pts[1])
    for opt in (["--last", "1"], ["--ema", "0.9"], ["--every", "2"], ["--weights", "1,3"]):
        proc = cli(user, "average", b, a, *opt, "-o", "x.safetensors")
        one_line(proc, 2, opt[0], "alpha.pt has no epoch or step", "--given-order")
        assert not (user / "x.safetensors").exists()
    # uniform: order does not change the mean; the plan says which order it used
    plan = cli(user, "average", b, a, "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["order"] == "name"
    assert "in training order by the numbers in the names" in cli(
        user, "average", b, a, "--dry-run").stdout
    # --given-order: the order typed, weights applied to it
    given = cli(user, "average", b, a, "--weights", "1,3", "--given-order", "-o", "w.pt",
                "--json")
    assert given.returncode == 0, given.stderr
    body = json.loads(given.stdout)
    assert body["order"] == "given" and body["inputs"] == [b, a]
    sb, sa = torch.load(b), torch.load(a)
    got = torch.load(user / "w.pt")
    got = got.get("state_dict", got)
    for k, v in sb.items():
        if v.is_floating_point():
            want = ((sb[k].double() + 3 * sa[k].double()) / 4).to(v.dtype)
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-7)


def test_a_file_without_an_epoch_among_epochs_is_not_slotted_in_by_name(user):
    pts = _pt(user)
    _bare(user, "final.pt", pts[-1])
    shutil.copy(pts[-1], user / "spare.bin")  # not caught by the glob
    proc = cli(user, "average", "runs/*.pt", "--ema", "0.5", "-o", "e.safetensors")
    one_line(proc, 2, "--ema", "final.pt has no epoch or step")
    ok = cli(user, "average", *pts, "--ema", "0.5", "--dry-run", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["order"] == "epoch", ok.stderr


# 10. --last beyond the inputs is refused, not clamped.

def test_last_more_than_the_inputs_is_refused(user):
    proc = cli(user, "average", *_pt(user), "--last", "50", "-o", "l.safetensors")
    one_line(proc, 2, "--last 50", "more inputs than there are (4")
    proc = cli(user, "average", *_pt(user), "--last", "0", "-o", "l.safetensors")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# 5. An exception in the user's code: a line naming it, its traceback, and JSON on stdout.

@pytest.mark.parametrize("args,names", [
    (["--model", "mymodule:build", "--data", "mymodule:missing"],
     "the data function mymodule:missing raised FileNotFoundError"),
    (["--model", "mymodule:bad_factory", "--data", "mymodule:data"],
     "the model factory mymodule:bad_factory raised ValueError: my factory is broken"),
    (["--model", "mymodule:build", "--data", "mymodule:tiny", "--split", "train"],
     "the model's forward pass raised RuntimeError"),
])
def test_an_exception_in_the_users_code_is_named_and_json_still_answers(user, args, names):
    for cmd in ("eval", "bn-fix"):
        extra = ["-o", "fixed.safetensors"] if cmd == "bn-fix" else []
        if cmd == "bn-fix" and "--split" in args:
            args = [a for a in args if a not in ("--split", "train")]
        proc = cli(user, cmd, _pt(user)[-1], *args, *extra, "--json")
        assert proc.returncode == 1, proc.stderr
        assert json.loads(proc.stdout) == {"error": json.loads(proc.stdout)["error"],
                                           "exit_code": 1}
        assert names in json.loads(proc.stdout)["error"]
        first = proc.stderr.splitlines()[0]
        assert first.startswith("ckptavg: error: ") and names in first, proc.stderr
        assert "your code: its traceback follows" in first
        assert "Traceback (most recent call last)" in proc.stderr
        assert not (user / "fixed.safetensors").exists()


# #35: values inferred from data only when known; the user's kwargs win; kwarg mistakes.

def test_an_unknown_class_count_leaves_the_factorys_default(user):
    import sys

    sys.path.insert(0, str(user))
    try:
        import mymodule
        net = mymodule.build4()
    finally:
        sys.path.remove(str(user))
        sys.modules.pop("mymodule", None)
    torch.save({"epoch": 1, "model_state_dict": net.state_dict()}, user / "four.pt")
    proc = cli(user, "eval", "four.pt", "--model", "mymodule:build4", "--data", "mymodule:four",
               "--split", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 16


@pytest.mark.parametrize("kwargs,rc,needles", [
    ('{"bogus": 1}', 2, ("--model-kwargs", "takes no argument 'bogus'",
                         "it takes: num_classes, in_channels")),
    ('{"num_classes": 10, "depth": 3}', 2, ("--model-kwargs", "'depth'")),
])
def test_kwarg_mistakes_are_one_line_naming_the_option(user, kwargs, rc, needles):
    proc = cli(user, "eval", _pt(user)[-1], "--model", "mymodule:build", "--data",
               "mymodule:data", "--model-kwargs", kwargs)
    one_line(proc, rc, *needles)


# 6. The same mistake, the same exit code: a name that names nothing is a usage error.

@pytest.mark.parametrize("args,needles", [
    (["--model", "mymodule:buidl", "--data", "mymodule:data"],
     ("--model mymodule:buidl", "did you mean mymodule:build")),
    (["--model", "mymodule:build", "--data", "mymodule:fmnsit"],
     ("--data mymodule:fmnsit", "has no 'fmnsit'")),
    (["--model", "resnet18", "--data", "mymodule:data"], ("--model resnet18", "unknown model")),
    (["--model", "nosuch:build", "--data", "mymodule:data"], ("--model nosuch:build",)),
])
def test_a_name_that_names_nothing_is_exit_2(user, args, needles):
    proc = cli(user, "eval", _pt(user)[-1], *args)
    one_line(proc, 2, *needles)


# 9. Messages that are true.

def test_ctrl_c_is_one_prefixed_line_and_no_blank_one(capsys, monkeypatch, tmp_path):
    from ckptavg.cli.app import main
    from ckptavg.engine import write as engine
    from tests.conftest import write_safetensors

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "execute", interrupted)
    files = write_safetensors(str(tmp_path), 2)
    with pytest.raises(SystemExit) as e:
        main(["average", *files, "-o", str(tmp_path / "out.safetensors")])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("ckptavg: interrupted") and err.count("\n") == 1, repr(err)
    assert not (tmp_path / "out.safetensors").exists()


def test_messages_say_what_is_true(user, tmp_path):
    ck = _pt(user)[-1]
    # a damaged file read by eval: nothing to write, so nothing is said of writing
    raw = open(ck, "rb").read()
    i = raw.index(b"data/0") + 200
    (user / "bad.pt").write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
    proc = cli(user, "eval", "bad.pt", "--model", "mymodule:build", "--data", "mymodule:data")
    assert proc.returncode == 1 and "nothing was written" not in proc.stderr, proc.stderr
    # averaging it says so
    proc = cli(user, "average", "bad.pt", _pt(user)[0], "-o", "avg.safetensors")
    assert proc.returncode == 1 and "nothing was written" in proc.stderr, proc.stderr
    # a folder that takes no files is not "gone"
    proc = cli(user, "average", *_pt(user), "-o", "/proc/swa.safetensors")
    one_line(proc, 1, "takes no new files")
    # --into object storage: said to be unsupported, not missing
    proc = cli(user, "average", *_pt(user), "--into", "s3://bucket/swa.safetensors")
    one_line(proc, 2, "--into s3://bucket/swa.safetensors", "not supported")
    # a whole pickled module: no --key suggestion that would fail the same way
    torch.save({"epoch": 1, "model": torch.nn.Linear(2, 2)}, user / "module.pt")
    proc = cli(user, "average", "module.pt", _pt(user)[0], "-o", "m.safetensors")
    one_line(proc, 1, "entry 'model' holds a pickled torch.nn.modules.linear.Linear",
             "save model.state_dict()")
    assert "--key" not in proc.stderr


def test_no_strip_prefix_hint_for_a_real_submodule(user):
    """torchvision's VGG has `features.`: weights of another network under it are not
    a wrapper prefix to strip."""
    torch.save({"features.weight": torch.ones(2, 2), "features.bias": torch.ones(2)},
               user / "other.pt")
    proc = cli(user, "eval", "other.pt", "--model", "torchvision:vgg11", "--data",
               "mymodule:data", "--model-kwargs", '{"num_classes": 10}')
    assert proc.returncode == 1, proc.stderr
    assert "weights do not fit the model" in proc.stderr
    assert "--strip-prefix" not in proc.stderr


def test_the_bn_data_warning_names_the_model_the_command_needs(user):
    from safetensors.torch import save_file
    state = torch.load(_pt(user)[-1])["model_state_dict"]
    save_file(state, str(user / "fixed.safetensors"), {"bn.stale": "false",
                                                        "bn.data": "mymodule:loader"})
    proc = cli(user, "eval", "fixed.safetensors", "--model", "mymodule:build", "--data",
               "mymodule:data", "--json")
    assert proc.returncode == 0, proc.stderr
    warning = next(w for w in json.loads(proc.stdout)["warnings"] if "bn.data" in w)
    assert "ckptavg bn-fix fixed.safetensors --data mymodule:data --model mymodule:build" \
        in warning


def _network_commands():
    """Every command that builds a network (takes --model and --data), with arguments that
    reach the build: the user's epoch files as its checkpoints."""
    from ckptavg.cli import cli

    found = sorted(n for n, c in cli.commands.items()
                   if {"--model", "--data"} <= {o for p in c.params for o in getattr(p, "opts", [])})
    assert {"bn-fix", "eval", "ensemble", "soup", "search", "width", "train"} <= set(found)
    return found


def _reach(user, command):
    pts = _pt(user)
    return {"bn-fix": [pts[-1], "-o", "fixed.pt"], "eval": [pts[-1]],
            "ensemble": pts[-2:], "soup": [*pts, "--holdout", "8", "-o", "soup.pt"],
            "search": [*pts, "--holdout", "8", "-o", "best.pt"], "width": pts[-2:],
            "train": ["--epochs", "2", "-o", "run"]}[command]


@pytest.mark.parametrize("command", _network_commands())
@pytest.mark.parametrize("args,needles", [
    (["--model", "mymodule:buidl", "--data", "mymodule:data"], ("--model mymodule:buidl",)),
    (["--model", "mymodule:build", "--data", "mymodule:fmnsit"], ("--data mymodule:fmnsit",)),
    (["--model", "resnet18", "--data", "mymodule:data"], ("--model resnet18",)),
], ids=["factory", "data", "registry"])
def test_every_command_that_builds_a_network_refuses_a_name_the_same_way(user, command, args,
                                                                           needles):
    """Issue #34, item 6, walked over every command that takes --model and --data: a name
    that names nothing is exit 2 naming the option as typed, with nothing written."""
    before = sorted(os.listdir(user))
    proc = cli(user, command, *_reach(user, command), *args)
    one_line(proc, 2, *needles)
    assert sorted(os.listdir(user)) == before


@pytest.mark.parametrize("command", ["average", "search", "swag"])
def test_an_empty_epoch_window_names_both_bounds_in_every_command(user, command):
    proc = cli(user, command, *_pt(user), "--from-epoch", "4", "--to-epoch", "2", "-o", "x.safetensors",
               *(["--model", "mymodule:build", "--data", "mymodule:data"]
                 if command == "search" else []))
    one_line(proc, 2, "--from-epoch", "--to-epoch")


@pytest.mark.parametrize("cmd", ["soup", "search"])
def test_a_holdout_as_large_as_the_training_images_names_holdout_alone(user, cmd):
    """Issue #34, item 6: `search --holdout 6000` named the hidden --subset; now the line
    names --holdout with its value and what it is held out of."""
    proc = cli(user, cmd, *_pt(user), "--holdout", "60", "--model", "mymodule:build",
               "--data", "mymodule:data", "-o", "x.safetensors")
    one_line(proc, 2, "--holdout 60: must be less than the 40 training images",
             "the first --train-images")
    assert "--subset" not in proc.stderr and not (user / "x.safetensors").exists()
