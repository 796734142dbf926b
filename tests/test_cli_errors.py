"""Every option of every command, given a bad value, is refused in one line that names the
option as typed, with exit 2 (a usage error); with --json, stdout holds an error object.
The library's own range checks (OptionError) are spelled by each command the same way."""

from __future__ import annotations

import json
import os

import click
import pytest

from ckptavg.cli import cli, main
from tests.conftest import run_cli, write_safetensors


def _run(capsys, args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


# Options whose values are free text checked by a callback: a value it refuses.
CALLBACK_BAD = {"weights": "a,b", "model_kwargs": "{not json", "shard_size": "huge",
                "labels": "one", "seed_list": "1,x"}


def _bad_value(p: click.Option) -> str | None:
    """A value the option's own type or callback refuses, or None (free text, flags)."""
    if p.is_flag or p.count:
        return None
    if p.name in CALLBACK_BAD:
        return CALLBACK_BAD[p.name]
    t = p.type
    if isinstance(t, click.IntRange):
        return str(t.min - 1) if t.min is not None else str(t.max + 1)
    if isinstance(t, click.FloatRange):
        return str(t.min - 1) if t.min is not None else str(t.max + 1)
    if isinstance(t, click.Choice):
        return "no-such-choice"
    if t is click.INT:
        return "x"
    if t is click.FLOAT:
        return "x"
    return None


def _cases():
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Option) and _bad_value(p) is not None:
                yield name, p


CASES = list(_cases())


def test_the_walk_covers_every_command_with_constrained_options():
    commands = {name for name, _ in CASES}
    assert {"average", "bn-fix", "eval", "train", "swag", "soup", "search", "width",
            "replicate", "ensemble", "demo", "inspect", "beyond"} <= commands
    assert len(CASES) > 60


@pytest.mark.parametrize("command,param", CASES, ids=[f"{c}{p.opts[-1]}" for c, p in CASES])
def test_every_option_with_a_bad_value_is_named_one_line_exit_2(capsys, command, param):
    flag = param.opts[-1]
    code, out, err = _run(capsys, [command, flag, _bad_value(param), "--json"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), err
    assert flag in lines[0] or any(o in lines[0] for o in param.opts), err
    assert "Traceback" not in err
    body = json.loads(out)
    assert body["exit_code"] == 2 and flag in body["error"]


@pytest.fixture
def files(tmp_path):
    return write_safetensors(str(tmp_path), 3)


@pytest.mark.parametrize("args,named", [
    (["--last", "0"], "--last"),
    (["--every", "0"], "--every"),
    (["--ema", "1.5"], "--ema 1.5"),
    (["--weights", "1,2"], "--weights"),
    (["--weights", "1,-1,1"], "--weights"),
    (["--weights", "1,1,1", "--ema", "0.5"], "--weights / --ema"),
    (["--cycle-ends"], "--cycle-ends"),
    (["--best", "2"], "--metric"),
    (["--accumulate", "float16"], "--accumulate"),
    (["--into", "{out}", "--weights", "1,1,1"], "--into"),
])
def test_library_range_checks_name_the_option_as_typed(capsys, tmp_path, files, args, named):
    out = str(tmp_path / "avg.safetensors")
    args = [a.format(out=out) for a in args]
    if "--into" in args:
        code, _, err = _run(capsys, ["average", *files, "-o", out, "-q"])
        assert code == 0, err
    code, stdout, err = _run(capsys, ["average", *files, *args, "-o", out + "2.safetensors",
                                      "--json"])
    assert code == 2, err
    assert err.count("\n") == 1 and named in err, err
    assert json.loads(stdout)["exit_code"] == 2


def test_missing_output_is_a_usage_error_naming_it(capsys, files):
    code, _, err = _run(capsys, ["average", *files])
    assert code == 2 and "-o/--output: missing" in err


def test_a_short_option_is_named_as_typed(capsys, files, tmp_path):
    code, _, err = _run(capsys, ["average", *files, "-o", str(tmp_path / "x.txt")])
    assert code == 2 and f"-o {tmp_path / 'x.txt'}: unknown output suffix" in err


def test_a_problem_in_the_files_is_exit_1_with_a_json_error(tmp_path, files):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    proc = run_cli("average", files[0], str(bad), "-o", tmp_path / "o.safetensors", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == {"error": proc.stderr.strip()[len("ckptavg: error: "):],
                                       "exit_code": 1}
    assert not (tmp_path / "o.safetensors").exists()


def test_warnings_reach_stderr_with_json_too(tmp_path, files):
    proc = run_cli("average", files[0], "-o", tmp_path / "one.safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["warnings"]
    assert warnings and all(f"ckptavg: warning: {w}" in proc.stderr for w in warnings)
    assert os.path.exists(tmp_path / "one.safetensors")


@pytest.mark.parametrize("args,named", [
    (["bn-fix", "{ck}", "--fraction", "2"], "--fraction 2: must be in (0, 1]"),
    (["bn-fix", "{ck}", "--batches", "1", "--fraction", "0.5"], "--batches / --fraction"),
    (["train", "--epochs", "3", "--swa-start", "50", "--data", "fashion-mnist", "--model",
      "tiny", "-o", "{tmp}/run"], "--swa-start 50: an epoch in 1..3"),
    (["train", "--epochs", "3", "--cycle", "0", "--data", "fashion-mnist", "--model", "tiny",
      "-o", "{tmp}/run"], "--cycle 0"),
])
def test_other_commands_name_the_option_too(capsys, tmp_path, files, args, named):
    args = [a.format(ck=files[0], tmp=tmp_path) for a in args]
    code, _, err = _run(capsys, args)
    assert code == 2, err
    assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "run").exists()
