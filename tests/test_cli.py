import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import ckptavg
from ckptavg.cli import cli, parse_size
from tests.conftest import ROOT, known_state, leftovers, reference_mean, run_cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_does_not_import_torch():
    code = ("import sys; from ckptavg.cli import cli, main\n"
            "for argv in [['--help']] + [[c, '--help'] for c in cli.commands]:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, argv\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok', len(cli.commands))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok 16"  # verify is the 16th
    modules = subprocess.run([sys.executable, "-c", "import sys, ckptavg; print(' '.join(sys.modules))"],
                             capture_output=True, text=True).stdout.split()
    assert "ckptavg" in modules and "torch" not in modules


def test_average_json_summary(tmp_path, ckpts):
    out = tmp_path / "swa.safetensors"
    r = invoke("average", *ckpts, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["n"] == 4 and summary["output"] == str(out)
    tensor_bytes = sum(v.numel() * v.element_size() for v in known_state(1).values())
    assert summary["bytes_out"] == tensor_bytes < os.path.getsize(out)  # + header
    assert summary["peak_rss_bytes"] > 0 and summary["seconds"] >= 0
    got, _ = ckptavg.load(out)
    assert torch.equal(got["bn.weight"], reference_mean([known_state(i) for i in range(1, 5)])["bn.weight"])


def test_average_quiet_prints_nothing(tmp_path, ckpts):
    r = invoke("average", *ckpts, "-o", tmp_path / "a.safetensors", "-q")
    assert r.exit_code == 0 and r.output == ""


def test_dry_run_plan(tmp_path, ckpts):
    r = invoke("average", *ckpts, "--from-epoch", 3, "--dry-run")
    assert r.exit_code == 0
    assert "uniform average of 2 input(s)" in r.output
    assert "epoch-0003.safetensors" in r.output and "epoch-0001" not in r.output
    assert not any(f.endswith(".safetensors") and "epoch" not in f for f in os.listdir(tmp_path))


def test_weights_option(tmp_path, ckpts):
    r = invoke("average", *ckpts, "-o", tmp_path / "w.pt", "--weights", "1,1,1,5", "--json")
    assert json.loads(r.output)["weights"] == [0.125, 0.125, 0.125, 0.625]
    r = invoke("average", *ckpts, "-o", tmp_path / "w.pt", "--weights", "1,x")
    assert r.exit_code == 2 and "numbers separated by commas" in r.output


def test_into_updates_in_place(tmp_path, ckpts):
    run = tmp_path / "swa.safetensors"
    assert invoke("average", ckpts[0], ckpts[1], "-o", run, "-q").exit_code == 0
    assert invoke("average", ckpts[2], ckpts[3], "--into", run, "-q").exit_code == 0
    assert ckptavg.load(run)[1]["average.n"] == "4"


def test_inspect_text_and_json(tmp_path, ckpts):
    r = invoke("inspect", ckpts[0])
    assert r.exit_code == 0
    assert "safetensors, 8 tensors" in r.output and "train.epoch = 1" in r.output
    assert "conv.weight" in r.output and "[4, 2, 3, 3]" in r.output
    info = json.loads(invoke("inspect", ckpts[0], "--json").output)
    assert info["tensors"] == 8 and info["bytes_per_dtype"]["int64"] == 8
    torch.save({"model": known_state(1)}, tmp_path / "x.pt")
    assert "torch, 8 tensors" in invoke("inspect", tmp_path / "x.pt", "--keys", 2).output


@pytest.mark.parametrize("args,message,rc", [
    (["missing.safetensors"], "missing.safetensors: no such file", 1),
    (["{a}", "--weights", "1,2"], "--weights: 2 given for 1 selected inputs", 2),
    (["{a}", "--ema", "0.9", "--weights", "1"], "--weights / --ema: exclude each other", 2),
    (["{a}", "-o", "{out}.txt"], "-o {out}.txt: unknown output suffix", 2),
    (["{a}", "-o", "{a}"], "is one of the inputs", 1),
    (["{a}", "{b}", "--from-epoch", "99"], "--from-epoch: no input in the window 99..: the inputs' epochs run from 1 to 2", 2),
])
def test_user_errors_are_one_line_and_no_output(tmp_path, ckpts, args, message, rc):
    """A problem found in the files exits 1; an option's value, a usage error, exits 2 and
    names the option as typed."""
    out = tmp_path / "out"
    args = [a.format(a=ckpts[0], b=ckpts[1], out=out) for a in args]
    if "-o" not in args:
        args += ["-o", str(out) + ".safetensors"]
    before = set(os.listdir(tmp_path))
    proc = run_cli("average", *args)
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.strip().splitlines()
    message = message.format(out=out)
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert set(os.listdir(tmp_path)) == before


def test_usage_error_exit_2():
    proc = run_cli("average")
    assert proc.returncode == 2 and "Missing argument" in proc.stderr
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20


def test_subprocess_end_to_end(tmp_path, ckpts):
    out = tmp_path / "swa.pt"
    proc = run_cli("average", str(tmp_path / "epoch-*.safetensors"), "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 4
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    proc = run_cli("inspect", out, "--json")
    assert json.loads(proc.stdout)["metadata"]["average.n"] == "4"


# The CLI with a writer slowed to 0.2 s per tensor: a small run is reliably caught mid-write.
SLOW_WRITER = """
import sys, time
from ckptavg.io import writer
write = writer.SafetensorsWriter.write
def slow(self, key, tensor):
    write(self, key, tensor)
    time.sleep(0.2)
writer.SafetensorsWriter.write = slow
from ckptavg.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_old_output_intact(tmp_path, sig):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"in-{i}.safetensors"))
        save_file({f"t{j}": torch.full((1 << 14,), float(i)) for j in range(8)}, paths[-1])
    out = tmp_path / "swa.safetensors"
    save_file({"old": torch.ones(3)}, str(out), metadata={"average.n": "2"})  # an earlier output
    old = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, "average", *paths, "-o", str(out),
                             "-q"], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".tmp" in f for f in os.listdir(tmp_path)):
        time.sleep(0.01)
    time.sleep(0.3)  # a tensor or two written
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the run ended before the signal"
    assert out.read_bytes() == old  # the old output, never a partial one
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert leftovers(tmp_path) == []  # a catchable signal also removes the temp file


def _stale(tmp_path):
    from tests.fakedata import tiny_bn, write_mnist

    write_mnist(str(tmp_path / "data"), n_train=32, n_test=20)
    torch.manual_seed(0)
    p = tmp_path / "swa.safetensors"
    ckptavg.save(tiny_bn().state_dict(), p, {"model.arch": "tiny_bn",
                                             "data.name": "fashion-mnist", "bn.stale": "true"})
    return p, tmp_path / "data"


def test_bn_fix_and_eval_commands(tmp_path):
    p, data = _stale(tmp_path)
    r = invoke("eval", p, "--data-dir", data, "--json")
    assert r.exit_code == 0
    assert "bn.stale=true" in r.stderr and json.loads(r.stdout)["samples"] == 20
    r = invoke("bn-fix", p, "--data-dir", data, "--batch-size", 8, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["samples"] == 32 and res["bn_layers"] == 1
    r = invoke("eval", p, "--data-dir", data)
    assert r.exit_code == 0 and "warning" not in r.stderr and "accuracy" in r.stdout


def test_bn_fix_subprocess_errors_are_one_line(tmp_path):
    p, data = _stale(tmp_path)
    proc = run_cli("bn-fix", p, "--data-dir", tmp_path / "nowhere", "--model", "tests.fakedata:tiny_bn")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ckptavg: error: fashion-mnist train split not found")
    proc = run_cli("bn-fix", p, "--model", "preresnet146")
    assert proc.returncode == 2 and "did you mean preresnet164" in proc.stderr


def test_models_command():
    r = invoke("models")
    assert r.exit_code == 0 and "preresnet164" in r.output and "torchvision:NAME" in r.output
    assert "wideresnet28_10" in json.loads(invoke("models", "--json").output)


def test_bn_fix_without_bn_exits_0(tmp_path):
    from tests.fakedata import write_mnist, zero_linear

    write_mnist(str(tmp_path))
    p = tmp_path / "lin.safetensors"
    ckptavg.save(zero_linear().state_dict(), p, {"model.arch": "zero_linear",
                                                 "data.name": "fashion-mnist"})
    r = invoke("bn-fix", p, "--data-dir", tmp_path)
    assert r.exit_code == 0 and "no BatchNorm" in r.output


def test_experiment_commands(tmp_path):
    from tests.fakedata import tiny_bn, write_mnist

    write_mnist(str(tmp_path / "data"), n_train=32, n_test=16)
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp_path / f"m{i}.safetensors")
        ckptavg.save(tiny_bn().state_dict(), paths[-1],
                     {"model.arch": "tiny_bn", "data.name": "fashion-mnist"})
    data = tmp_path / "data"
    r = invoke("ensemble", str(tmp_path / "m*.safetensors"), "--data-dir", data, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 2
    png = tmp_path / "w.png"
    r = invoke("width", *paths, "--data-dir", data, "--rays", 2, "--points", 2, "-o", png,
               "--labels", "SGD,SWA")
    assert r.exit_code == 0, r.output
    assert "SGD: test error" in r.stdout and png.exists() and (tmp_path / "w.csv").exists()
    r = invoke("width", *paths, "--labels", "one")
    assert r.exit_code == 2 and "--labels" in r.output
    r = invoke("width", *paths, "--data-dir", data, "--rays", 1, "--points", 4,
               "--max-distance", 0.1, "--no-bn-fix", "-o", png, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [s["label"] for s in res["summary"]] == ["m0.safetensors", "m1.safetensors"]
    assert len(res["rows"]) == 2 * 4 and res["rows"][-1]["distance"] == pytest.approx(0.1)
    r = invoke("replicate", "--preset", "nope", "-o", tmp_path / "r")
    assert r.exit_code == 1 and "unknown preset" in r.stderr


def test_train_command_and_resume(tmp_path):
    from tests.fakedata import write_mnist

    write_mnist(str(tmp_path / "data"), n_train=40, n_test=10)
    args = ["train", "--model", "tests.fakedata:tiny_bn", "--data", "fashion-mnist", "--data-dir",
            tmp_path / "data", "--epochs", 3, "--swa-start", 2, "--swa-lr", 0.01, "--batch-size",
            16, "--holdout", 8, "-o", tmp_path / "run"]
    r = invoke(*args, "--stop-after", 2, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["epochs_run"] == 2 and len(res["checkpoints"]) == 2 and "val_acc" in res["last"]
    r = invoke(*args)
    assert r.exit_code == 1 and "--resume" in r.stderr
    r = invoke(*args, "--resume", "--lr", 0.2)
    assert r.exit_code == 1 and "resuming with lr=0.2" in r.stderr
    r = invoke(*args, "--resume")
    assert r.exit_code == 0 and "trained 1 epoch(s)" in r.stdout
    meta = ckptavg.load(tmp_path / "run" / "epoch-0003.safetensors")[1]
    assert meta["data.train_images"] == "32"
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["epoch"] for x in rows] == [1, 2, 3]


def test_replicate_command_tiny_preset(tmp_path):
    from tests.fakedata import write_mnist

    write_mnist(str(tmp_path / "data"), n_train=48, n_test=10)
    r = invoke("replicate", "--preset", "fashion-mnist", "--seeds", 1, "-o", tmp_path / "rep",
               "--data-dir", tmp_path / "data", "--budget", 4, "--swa-start", 2, "--train-images", 40,
               "--holdout", 8, "--model", "tests.fakedata:tiny_bn", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "| SWA 1.5 budgets |" in r.stdout
    saved = json.load(open(tmp_path / "rep" / "results.json"))
    assert saved["config"]["model"] == "tests.fakedata:tiny_bn" and saved["seeds"] == [0]
    assert [c["epoch"] for c in saved["per_seed"][0]["swa_curve"]] == [2, 3, 4, 5, 6]
    assert leftovers(tmp_path / "rep") == []


def test_quiet_means_silent_and_warnings_otherwise(tmp_path):
    p, data = _stale(tmp_path)
    r = invoke("eval", p, "--data-dir", data, "-q")
    assert r.exit_code == 0 and r.output == ""
    r = invoke("models", "-q")
    assert r.exit_code == 0 and r.output == ""
    r = invoke("inspect", p, "-q")
    assert r.exit_code == 0 and r.output == ""


def test_a_users_model_module_in_the_working_folder_is_found(tmp_path):
    """As `python -m` does: the current folder is on the import path for --model/--data."""
    from tests.fakedata import write_mnist

    write_mnist(str(tmp_path / "data"), n_train=16, n_test=8)
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def build(num_classes=10, in_channels=3):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 2, 3), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(2 * 26 * 26, num_classes))\n"
        "def data(split='train'):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(1, 28, 28, generator=g), i % 10) for i in range(12)]\n")
    import importlib
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        net = importlib.import_module("mynets").build(10, 1)
    finally:
        _sys.path.remove(str(tmp_path))
        _sys.modules.pop("mynets", None)
    ckptavg.save(net.state_dict(), tmp_path / "m.safetensors")
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "eval", "m.safetensors", "--model",
                           "mynets:build", "--data", "mynets:data", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["samples"] == 12  # built with the data's 1 channel


@pytest.mark.parametrize("start", ["default", "ignored"])
def test_ctrl_c_during_the_torch_import_is_held_until_it_is_done(start):
    """Ctrl-C inside torch's C++ initialisation aborted the interpreter (exit -6); the
    commands hold SIGINT/SIGTERM for the import and raise them right after it. A process
    that ignores SIGINT (a background job of a non-interactive shell) keeps ignoring it."""
    first = ("signal.signal(signal.SIGINT, signal.default_int_handler)\n" if start == "default"
             else "signal.signal(signal.SIGINT, signal.SIG_IGN)\n")
    script = (
        "import builtins, os, signal, sys\n"
        + first +
        "before = signal.getsignal(signal.SIGINT)\n"
        "from ckptavg import cli\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules:\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # lands as the import starts\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "try:\n"
        "    cli._import_torch_holding_signals()\n"
        "except KeyboardInterrupt:\n"
        "    print('held until imported:', 'torch' in sys.modules)\n"
        "print('handler restored:', signal.getsignal(signal.SIGINT) is before)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    held = ["held until imported: True"] if start == "default" else []
    assert proc.stdout.splitlines() == held + ["handler restored: True"]


@pytest.mark.parametrize("command", ["average", "bn-fix", "eval"])
def test_help_examples_name_only_options_the_command_has(command):
    """Issue #34, item 11: average, bn-fix and eval show examples; each example parses as
    that command (every flag is one of its options, the arguments it takes are there)."""
    import shlex

    text = invoke(command, "--help").output
    examples = [line.split("#")[0].strip() for line in text.splitlines()
                if line.strip().startswith(f"ckptavg {command} ")]
    assert len(examples) >= 3, text
    cmd = cli.commands[command]
    names = {n for p in cmd.params for n in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for example in examples:
        words = shlex.split(example)[2:]
        flags = [w.split("=")[0] for w in words if w.startswith("-")]
        assert set(flags) <= names, (example, set(flags) - names)
        ctx = cmd.make_context(command, words)  # raises a UsageError on a wrong example
        assert ctx.params is not None


def test_help_says_what_each_option_needs():
    """-o is marked required on average; --model says which kwargs a factory receives;
    eval takes one CHECKPOINT; -q of the reporting commands speaks of no progress bar."""
    assert "required, unless --into or --dry-run" in invoke("average", "--help").output
    bn = " ".join(invoke("bn-fix", "--help").output.split())
    assert "num_classes and in_channels" in bn and "--model-kwargs win" in bn
    assert "data.dir" in bn and "absolute path" in bn  # as the README says
    assert " eval [OPTIONS] CHECKPOINT\n" in invoke("eval", "--help").output
    for command in ("inspect", "models"):
        out = " ".join(invoke(command, "--help").output.split())
        assert "progress" not in out and "Print nothing but errors" in out


def test_the_version_is_the_one_the_readme_speaks_of():
    """`ckptavg --version` and the README's "Renamed options (X.Y)" name one release, and the
    package metadata says the same."""
    import re

    import tomllib

    version = invoke("--version").output.split()[-1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    renamed = re.search(r"### Renamed options \((\d+\.\d+)\)", readme).group(1)
    assert version.startswith(renamed + "."), (version, renamed)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == version == ckptavg.__version__
