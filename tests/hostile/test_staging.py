"""What a folder output writes beside itself (issue #33, items 3 and 7): the staging folder
is made exclusively and never through a link; a staging name that is a link, a file, or a
folder ckptavg did not make is refused in one line with nothing inside it touched; a failed
run leaves no staging names behind; a damaged plan.json under --resume is one line."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import leftovers, run_cli


def _inputs(folder, n=3):
    paths = []
    for i in range(n):
        p = folder / f"epoch-{i + 1:04d}.safetensors"
        save_file({f"t{j}": torch.full((5_000,), float(i + j)) for j in range(4)}, str(p),
                  metadata={"train.epoch": str(i + 1)})
        paths.append(str(p))
    return paths


def _one_line(proc, *needles) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _users_folder(tmp_path):
    users = tmp_path / "precious"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    (users / "model-00001-of-00004.safetensors").write_bytes(b"mine, not ckptavg's")
    return users, {p.name: p.read_bytes() for p in users.iterdir()}


def _unchanged(users, before) -> None:
    assert {p.name: p.read_bytes() for p in users.iterdir()} == before


def test_a_staging_name_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path):
    paths = _inputs(tmp_path)
    users, before = _users_folder(tmp_path)
    out = tmp_path / "out"
    stage = tmp_path / ".out.ckptavg-partial"
    stage.symlink_to(users, target_is_directory=True)
    proc = run_cli("average", *paths, "-o", out, "--shard-size", "30KB")
    _one_line(proc, str(stage), "is a link")
    _unchanged(users, before)
    assert stage.is_symlink() and not out.exists()
    # --resume reads nothing through it either
    proc = run_cli("average", *paths, "-o", out, "--shard-size", "30KB", "--resume")
    _one_line(proc, "is a link")
    _unchanged(users, before)


@pytest.mark.parametrize("kind", ["folder", "file", "dangling link"])
def test_a_staging_name_ckptavg_did_not_make_is_refused(tmp_path, kind):
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    stage = tmp_path / ".out.ckptavg-partial"
    if kind == "folder":
        stage.mkdir()
        (stage / "plan.json").write_text('{"version": 1}')
        (stage / "notes.txt").write_text("keep me")
    elif kind == "file":
        stage.write_text("keep me")
    else:
        stage.symlink_to(tmp_path / "nowhere")
    for extra in ([], ["--resume"]):
        proc = run_cli("average", *paths, "-o", out, "--shard-size", "30KB", *extra)
        _one_line(proc, str(stage))
        assert not out.exists()
    if kind == "folder":
        assert (stage / "notes.txt").read_text() == "keep me"
        assert (stage / "plan.json").read_text() == '{"version": 1}'
    elif kind == "file":
        assert stage.read_text() == "keep me"
    else:
        assert stage.is_symlink()


def test_a_folder_output_leaves_no_staging_name_behind(tmp_path):
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    run_cli("average", *paths, "-o", out, "--shard-size", "30KB", check=True)
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(out)) == sorted(
        [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
        + ["model.safetensors.index.json"])
    got = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            got.update(load_file(str(out / name)))
    for j in range(4):
        torch.testing.assert_close(got[f"t{j}"], torch.full((5_000,), 1.0 + j), rtol=0, atol=0)


def _interrupted_staging(tmp_path, paths, out):
    """A staging folder as a killed run leaves it: made by ckptavg, with its plan."""
    import ckptavg
    from ckptavg.io import writer

    real, opened = writer.ShardedWriter._open_next, [0]

    def open_next(self):
        opened[0] += 1
        if opened[0] > 2:
            raise KeyboardInterrupt
        real(self)

    writer.ShardedWriter._open_next = open_next
    try:
        with pytest.raises(KeyboardInterrupt):
            ckptavg.average(paths, out, shard_size=30_000)
    finally:
        writer.ShardedWriter._open_next = real
    return tmp_path / f".{out.name}.ckptavg-partial"


@pytest.mark.parametrize("plan", [
    {"version": 1}, [1, 2, 3], "text", None, {"version": 1, "inputs": "x"},
    {"version": 1, "inputs": [{"file": 3, "fingerprint": []}], "averaging": {}, "specs": {},
     "shards": {}},
])
def test_a_damaged_plan_is_one_line_under_resume(tmp_path, plan):
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    stage = _interrupted_staging(tmp_path, paths, out)
    assert (stage / "plan.json").exists()
    (stage / "plan.json").write_text(json.dumps(plan) if plan is not None else "{not json")
    proc = run_cli("average", *paths, "-o", out, "--shard-size", "30KB", "--resume")
    line = _one_line(proc)
    assert "without --resume" in line
    assert not out.exists()
    # Without --resume, the run starts over from the same (ours) staging folder.
    run_cli("average", *paths, "-o", out, "--shard-size", "30KB", check=True)
    assert leftovers(tmp_path) == []


def test_a_full_disk_leaves_no_staging_folder(tmp_path):
    """The plan cannot be written: the line says nothing was written, and nothing is."""
    import resource
    import subprocess
    import sys

    paths = _inputs(tmp_path)
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", *paths, "-o", str(out),
                           "--shard-size", "30KB"], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120)
    _one_line(proc, "nothing was written")
    assert not out.exists() and leftovers(tmp_path) == []
