"""No output replaces an input or a file that is not ours; no input is counted twice."""

from __future__ import annotations

import hashlib
import os

import pytest

import ckptavg
from ckptavg.errors import CkptavgError, OutputError
from tests.conftest import known_state, leftovers, reference_mean, run_cli, write_safetensors


def digest(folder) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    paths = write_safetensors(d, 2)
    return d, paths


@pytest.mark.parametrize("how", ["folder of the inputs", "dot inside it", "user folder"])
def test_folder_output_never_deletes_what_is_not_ours(tmp_path, run_dir, how):
    d, paths = run_dir
    cwd = str(d) if how == "dot inside it" else None
    out = {"folder of the inputs": str(d), "dot inside it": ".", "user folder": str(tmp_path / "notes")}[how]
    if how == "user folder":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = digest(tmp_path)
    proc = run_cli_in(cwd, "average", *paths, "-o", out)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "not part of an earlier ckptavg output" in line
    assert digest(tmp_path) == before and leftovers(tmp_path) == [] and leftovers(d) == []


def run_cli_in(cwd, *args):
    if cwd is None:
        return run_cli(*args)
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}
    return subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env)


def test_an_earlier_output_folder_is_replaced(tmp_path, run_dir):
    _, paths = run_dir
    out = tmp_path / "avg"
    ckptavg.average(paths[:1], out, shard_size=200)
    ckptavg.average(paths, out, shard_size=200)
    got, _ = ckptavg.load(out)
    want = reference_mean([known_state(1), known_state(2)])
    assert all(bool((got[k] == want[k]).all()) for k in want)
    ckptavg.average(paths, tmp_path / "empty_dir_ok", shard_size=200)


def test_output_over_a_shard_of_an_input_folder(tmp_path, run_dir):
    _, paths = run_dir
    sharded = tmp_path / "shA"
    ckptavg.average(paths, sharded, shard_size=200)
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[0]
    before = digest(sharded)
    with pytest.raises(OutputError, match="same file as input"):
        ckptavg.average([sharded, paths[0]], sharded / shard)
    with pytest.raises(OutputError, match="same file as input"):
        ckptavg.average([sharded, paths[0]], sharded)  # the input folder itself
    assert digest(sharded) == before


def test_output_is_a_hard_link_or_symlink_of_an_input(tmp_path, run_dir):
    _, paths = run_dir
    link = tmp_path / "hard.safetensors"
    os.link(paths[0], link)
    sym = tmp_path / "sym.safetensors"
    os.symlink(paths[1], sym)
    before = digest(tmp_path)
    for out in (link, sym):
        with pytest.raises(OutputError, match="is one of the inputs"):
            ckptavg.average(paths, out)
    assert digest(tmp_path) == before


def test_output_named_like_a_file_but_a_folder(tmp_path, run_dir):
    _, paths = run_dir
    (tmp_path / "x.safetensors").mkdir()
    proc = run_cli("average", *paths, "-o", tmp_path / "x.safetensors")
    assert proc.returncode == 1 and "is a folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink", "other spelling"])
def test_an_input_given_twice_is_refused_naming_both(tmp_path, run_dir, how):
    d, paths = run_dir
    twin = {"same path": paths[0], "hard link": str(tmp_path / "last.safetensors"),
            "symlink": str(tmp_path / "best.safetensors"),
            "other spelling": os.path.join(str(d), ".", os.path.basename(paths[0]))}[how]
    if how == "hard link":
        os.link(paths[0], twin)
    if how == "symlink":
        os.symlink(paths[0], twin)
    with pytest.raises(CkptavgError, match="counted twice") as e:
        ckptavg.average([paths[0], paths[1], twin], tmp_path / "o.safetensors", dry_run=True)
    assert paths[0] in str(e.value) and twin in str(e.value)


def test_folder_input_and_its_own_shard_given_too(tmp_path, run_dir):
    _, paths = run_dir
    sharded = tmp_path / "shA"
    ckptavg.average(paths, sharded, shard_size=10**9)
    with pytest.raises(CkptavgError, match="counted twice"):
        ckptavg.average([sharded, sharded / "model-00001-of-00001.safetensors"],
                        tmp_path / "o.safetensors", dry_run=True)


def test_into_refuses_its_own_file_as_an_input(tmp_path, run_dir):
    _, paths = run_dir
    run = tmp_path / "run.safetensors"
    ckptavg.average(paths[:1], run)
    alias = tmp_path / "alias.safetensors"
    os.link(run, alias)
    before = open(run, "rb").read()
    r = ckptavg.average([alias], into=run)  # issue #33: left out, and said (never folded twice)
    assert any("the running average of --into among the inputs" in w for w in r.warnings)
    assert open(run, "rb").read() == before
