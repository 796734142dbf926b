"""`average --resume` (issue #27): a folder output that a failed or killed run left
unfinished is finished from the shards it completed; the result is bitwise the output of
an uninterrupted run (compared file by file), only the missing shards are reduced, and a
changed input or option is refused by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.errors import CkptavgError, OptionError
from ckptavg.io.staging import staging_path


def _inputs(folder, n=3, tensors=6, numel=20_000):
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        p = folder / f"epoch-{i + 1:04d}.safetensors"
        save_file({f"t{j}": torch.randn(numel, generator=g) for j in range(tensors)}, str(p),
                  metadata={"train.epoch": str(i + 1)})
        paths.append(str(p))
    return paths


def _files(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


SHARD = 100_000  # bytes: 6 tensors of 80,000 bytes -> 6 shards


def _fail_after(monkeypatch, shards: int, exc=KeyboardInterrupt):
    """Make the run fail while writing shard `shards + 1` (after `shards` were finished)."""
    from ckptavg.io import writer

    real = writer.ShardedWriter._open_next
    opened = [0]

    def open_next(self):
        opened[0] += 1
        if opened[0] > shards + 1:  # the call that opens shard k first finishes k - 1
            raise exc()
        real(self)

    monkeypatch.setattr(writer.ShardedWriter, "_open_next", open_next)


def _interrupted(monkeypatch, paths, out, shards: int = 2, **kw) -> None:
    """Run an average that is stopped (KeyboardInterrupt) after `shards` shards."""
    with monkeypatch.context() as m:
        _fail_after(m, shards)
        with pytest.raises(KeyboardInterrupt):
            ckptavg.average(paths, out, **kw)


def _computed(monkeypatch) -> list:
    """The keys each call of the engine's `execute` is given, from now on."""
    from ckptavg.engine import write as engine

    seen, real = [], engine.execute
    monkeypatch.setattr(engine, "execute", lambda plan, w, keys=None, **kw: (
        seen.append(list(keys) if keys is not None else None), real(plan, w, keys, **kw))[1])
    return seen


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    whole = tmp_path / "whole"
    ckptavg.average(paths, whole, shard_size=SHARD)
    out = tmp_path / "out"
    _interrupted(monkeypatch, paths, out, shard_size=SHARD)
    staging = staging_path(str(out))
    assert not out.exists() and sorted(n for n in os.listdir(staging) if n.endswith(".done")) \
        == ["model-00001-of-00006.safetensors.done", "model-00002-of-00006.safetensors.done"]
    seen = _computed(monkeypatch)  # only the missing shards are reduced
    r = ckptavg.average(paths, out, shard_size=SHARD, resume=True)
    assert seen == [["t2", "t3", "t4", "t5"]]
    assert any("2 of 6 shard(s) already done" in w for w in r.warnings)
    assert _files(out) == _files(whole)
    assert not os.path.exists(staging)


def test_a_failed_run_says_how_to_finish_it(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    _fail_after(monkeypatch, 3, lambda: OSError(28, "No space left on device"))
    with pytest.raises(CkptavgError) as e:
        ckptavg.average(paths, tmp_path / "out", shard_size=SHARD)
    assert "No space left on device" in str(e.value)
    assert "3 finished shard(s) are kept in" in str(e.value) and "--resume" in str(e.value)


def test_a_run_that_finished_nothing_leaves_nothing(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    _fail_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        ckptavg.average(paths, tmp_path / "out", shard_size=SHARD)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


def test_changed_inputs_and_options_are_refused_by_name(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    _interrupted(monkeypatch, paths, out, shard_size=SHARD)
    with pytest.raises(OptionError, match="weights"):
        ckptavg.average(paths, out, shard_size=SHARD, weights=[1, 2, 3], resume=True)
    with pytest.raises(OptionError, match="accumulate"):
        ckptavg.average(paths, out, shard_size=SHARD, accumulate="float32", resume=True)
    with pytest.raises(OptionError, match="dtype"):
        ckptavg.average(paths, out, shard_size=SHARD, dtype="bfloat16", resume=True)
    with pytest.raises(OptionError, match="shard"):
        ckptavg.average(paths, out, shard_size=2 * SHARD, resume=True)
    with pytest.raises(OptionError, match="epoch-0003.safetensors is no longer an input"):
        ckptavg.average(paths[:2], out, shard_size=SHARD, resume=True)
    time.sleep(0.01)
    save_file({f"t{j}": torch.zeros(20_000) for j in range(6)}, paths[1],
              metadata={"train.epoch": "2"})
    with pytest.raises(CkptavgError, match="epoch-0002.safetensors: changed since"):
        ckptavg.average(paths, out, shard_size=SHARD, resume=True)
    assert len([n for n in os.listdir(staging_path(str(out))) if n.endswith(".done")]) == 2


def test_a_damaged_finished_shard_is_made_again(tmp_path, monkeypatch):
    paths = _inputs(tmp_path)
    whole, out = tmp_path / "whole", tmp_path / "out"
    ckptavg.average(paths, whole, shard_size=SHARD)
    with monkeypatch.context() as m:
        _fail_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            ckptavg.average(paths, out, shard_size=SHARD)
    shard = os.path.join(staging_path(str(out)), "model-00001-of-00006.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    r = ckptavg.average(paths, out, shard_size=SHARD, resume=True)
    assert any("does not match its record" in w for w in r.warnings)
    assert _files(out) == _files(whole)


def test_resume_is_for_folder_outputs(tmp_path):
    paths = _inputs(tmp_path)
    with pytest.raises(OptionError, match="resume"):
        ckptavg.average(paths, tmp_path / "o.safetensors", resume=True)


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(tmp_path):
    from ckptavg.io.staging import claim

    out = str(tmp_path / "out")
    fd, _ = claim(staging_path(out), out)
    try:
        with pytest.raises(CkptavgError, match="another run is writing it now"):
            ckptavg.average(_inputs(tmp_path), out, shard_size=SHARD)
    finally:
        os.close(fd)


def test_killed_with_sigkill_then_resumed_from_the_command_line(tmp_path):
    """A real kill -9 mid-run: the finished shards survive; the same command with --resume
    gives the bytes of an uninterrupted run."""
    paths = _inputs(tmp_path, n=4, tensors=24, numel=2_000_000)  # 24 shards of 8 MB
    args = [*paths, "--shard-size", "9MB", "-q"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "ckptavg", "average", *args, "-o", whole], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "average", *args, "-o", out])
    staging = staging_path(str(out))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if os.path.isdir(staging) and sum(n.endswith(".done") for n in os.listdir(staging)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert not out.exists()
    done = sum(n.endswith(".done") for n in os.listdir(staging))
    r = subprocess.run([sys.executable, "-m", "ckptavg", "average", *args, "-o", out,
                        "--resume", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"{done} of 24 shard(s) already done" in r.stdout
    assert _files(out) == _files(whole) and not os.path.exists(staging)


def _dcp_as_torch(folder, tmp_path) -> dict:
    """A DCP folder read by torch's own converter (dcp_to_torch_save), then torch.load."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{os.path.basename(folder)}.pt"
    dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=True)


def test_a_dcp_output_resumes_from_its_staged_shards(tmp_path, monkeypatch):
    """--dcp stages the tensors as safetensors shards: a run stopped after two keeps them;
    --resume reduces only the rest, and torch's own DCP reader finds the float64 mean."""
    from ckptavg.io.dcp import DcpWriter

    monkeypatch.setattr(DcpWriter, "STAGE_SHARD", SHARD)  # 6 staged shards
    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    _interrupted(monkeypatch, paths, out, dcp=True)
    staging = staging_path(str(out))
    assert not out.exists() and sum(n.endswith(".done") for n in os.listdir(staging)) == 2
    with pytest.raises(OptionError, match="dcp"):  # the other kind of folder output
        ckptavg.average(paths, out, shard_size=SHARD, resume=True)
    seen = _computed(monkeypatch)
    r = ckptavg.average(paths, out, dcp=True, resume=True)
    assert seen == [["t2", "t3", "t4", "t5"]]
    assert any("2 of 6 shard(s) already done" in w for w in r.warnings)
    got = _dcp_as_torch(out, tmp_path)
    inputs = [ckptavg.load(p)[0] for p in paths]
    for k in inputs[0]:
        want = (sum(s[k].double() for s in inputs) / len(inputs)).float()
        assert torch.equal(got[k], want), k
    assert ckptavg.load(out)[1]["average.n"] == "3" and not os.path.exists(staging)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(p) for p in paths] + ["out", "out.pt"])


def test_a_dcp_save_that_fails_keeps_the_staged_shards(tmp_path, monkeypatch):
    """The disk fills during the final dcp.save: one line saying the shards are kept; the
    resumed run reduces nothing and saves."""
    from ckptavg.io import dcp

    paths = _inputs(tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        def full(*a, **k):
            raise OSError(28, "No space left on device")
        m.setattr(dcp, "save_dcp", full)
        with pytest.raises(CkptavgError) as e:
            ckptavg.average(paths, out, dcp=True)
    assert "No space left on device" in str(e.value) and "--resume" in str(e.value)
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    seen = _computed(monkeypatch)
    ckptavg.average(paths, out, dcp=True, resume=True)
    assert seen == [[]]
    whole = tmp_path / "whole"
    ckptavg.average(paths, whole, dcp=True)
    a, b = _dcp_as_torch(out, tmp_path), _dcp_as_torch(whole, tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
