"""`torchrun --nproc-per-node 2 -m ckptavg average ... -o DIR`: 2 real ranks (gloo,
127.0.0.1), the tensors split by bytes, one shard per rank; compared bitwise with one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from ckptavg.options import Selection
from tests.conftest import leftovers
from tests.distributed.conftest import torchrun


def _torchrun(*args, timeout=300):
    return torchrun("ckptavg", *args, timeout=timeout)


def _inputs(folder, n=4, bad=None):
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {"emb.weight": torch.randn(300, 64, generator=g),
                 "fc.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
                 "fc.bias": torch.randn(64, generator=g), "bn.running_mean": torch.randn(8),
                 "bn.num_batches_tracked": torch.tensor(10 * i)}
        if i == bad:
            state["fc.bias"] = torch.randn(65, generator=g)
        paths.append(folder / f"epoch-{i + 1:04d}.safetensors")
        save_file(state, paths[-1], {"train.epoch": str(i + 1), "model.arch": "x"})
    return paths


def test_two_ranks_write_the_same_average_as_one_process(tmp_path):
    paths = _inputs(tmp_path)
    proc = _torchrun("average", *paths, "--from-epoch", 2, "-o", tmp_path / "dist", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one summary, from rank 0
    assert summary["ranks"] == 2 and summary["n"] == 3
    index = json.load(open(tmp_path / "dist" / "model.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    ckptavg.average(paths, tmp_path / "single", selection=Selection(from_epoch=2))
    got, meta = ckptavg.load(tmp_path / "dist")
    want, want_meta = ckptavg.load(tmp_path / "single")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert meta["average.n"] == want_meta["average.n"] == "3"
    assert meta["model.arch"] == "x"
    # each input's content hash (issue #33): from the ranks' digests, as one process takes it
    got_inputs = json.loads(meta["average.inputs"])
    assert [e["content"] for e in got_inputs] == \
        [e["content"] for e in json.loads(want_meta["average.inputs"])]
    assert all(e["content"].startswith("xxh3-128:") and "pending" not in e["content"]
               for e in got_inputs)
    assert leftovers(tmp_path) == []


def test_two_ranks_apply_a_profile_as_one_process(tmp_path):
    """--profile under torchrun: the same weights, metadata and bytes as in one process."""
    paths = _inputs(tmp_path)
    proc = _torchrun("average", *paths, "--profile", "ema:halflife=1.5", "-o", tmp_path / "dist",
                     "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    single = ckptavg.average(paths, tmp_path / "single", profile="ema:halflife=1.5")
    # --json prints floats to 15 significant digits (docs/json.md); the files are compared bitwise
    assert summary["weights"] == pytest.approx(single.weights, rel=1e-14, abs=0)
    assert summary["profile"] == "ema:halflife=1.5"
    got, meta = ckptavg.load(tmp_path / "dist")
    want, want_meta = ckptavg.load(tmp_path / "single")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert meta["average.profile"] == want_meta["average.profile"] == "ema:halflife=1.5"


def test_a_mismatch_stops_both_ranks_with_one_line_and_leaves_nothing(tmp_path):
    paths = _inputs(tmp_path, bad=2)
    proc = _torchrun("average", *paths, "-o", tmp_path / "dist", timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ckptavg: error:")]
    assert len(lines) == 2 and all("do not match" in x for x in lines), proc.stderr[-3000:]
    assert not (tmp_path / "dist").exists() and leftovers(tmp_path) == []


def test_a_file_output_is_refused_under_torchrun(tmp_path):
    paths = _inputs(tmp_path, n=2)
    proc = _torchrun("average", *paths, "-o", tmp_path / "avg.safetensors", timeout=120)
    assert proc.returncode != 0
    assert "each rank writes one shard, so the output is a folder" in proc.stderr
    assert not (tmp_path / "avg.safetensors").exists()


def test_partition_balances_bytes():
    from ckptavg.io.base import TensorSpec
    from ckptavg.io.writer import partition

    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([100, 60, 50, 40, 5])]
    parts = partition(specs, 2)
    assert parts == [["t0", "t3"], ["t1", "t2", "t4"]]  # 140 vs 115 elements: largest first
    assert partition(specs[:1], 3) == [["t0"], [], []]


def _dcp_load(folder, like: dict, entry: str | None = None) -> dict:
    """Read a DCP checkpoint with torch's own loader into tensors shaped like `like`."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load({entry: state} if entry else state, checkpoint_id=str(folder), no_dist=True)
    return state


def test_dcp_output_from_one_process_and_two_ranks_is_what_dcp_load_reads(tmp_path):
    paths = _inputs(tmp_path)
    want = {k: (torch.stack([ckptavg.load(p)[0][k].double() for p in paths[1:]]).mean(0)
                .to(v.dtype) if v.is_floating_point() else ckptavg.load(paths[-1])[0][k])
            for k, v in ckptavg.load(paths[0])[0].items()}
    ckptavg.average(paths, tmp_path / "one.dcp", dcp=True, selection=Selection(from_epoch=2))
    one = _dcp_load(tmp_path / "one.dcp", want)
    for k in want:  # the float64 mean rounded once, and the newest input's integer
        assert torch.equal(one[k], want[k]), k
    assert ckptavg.load(tmp_path / "one.dcp")[1]["average.n"] == "3"  # ckptavg.json beside it
    proc = _torchrun("average", *paths, "--from-epoch", 2, "-o", tmp_path / "two.dcp", "--dcp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _dcp_load(tmp_path / "two.dcp", want)
    assert all(torch.equal(two[k], want[k]) for k in want)
    assert leftovers(tmp_path) == []
    # A DCP output never replaces a folder with something in it.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    import pytest

    from ckptavg.errors import OutputError

    with pytest.raises(OutputError, match="not an empty folder"):
        ckptavg.average(paths, tmp_path / "full", dcp=True)
    assert (tmp_path / "full" / "mine.txt").read_text() == "x"


def _rank1_disk_full(tmp_path):
    """A folder for PYTHONPATH whose sitecustomize makes rank 1's disk full (its shard
    writer cannot be made), and only rank 1's."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from ckptavg.io import writer\n"
        "    def broken(self, *a, **k):\n"
        "        raise OSError(28, 'No space left on device')\n"
        "    writer.SafetensorsWriter.__init__ = broken\n")
    return hook


def test_an_interrupted_two_rank_run_is_resumed_under_torchrun(tmp_path):
    """Rank 1 cannot write its shard (a full disk, injected through sitecustomize in that
    rank only): rank 0's finished shard is kept; the same torchrun command with --resume
    reduces only rank 1's share and gives the bytes of an uninterrupted run."""
    import os

    from ckptavg.io.staging import staging_path

    paths = _inputs(tmp_path)
    assert _torchrun("average", *paths, "-o", tmp_path / "whole", "-q").returncode == 0
    hook = _rank1_disk_full(tmp_path)
    out = tmp_path / "out"
    failed = torchrun("ckptavg", "average", *paths, "-o", out, "-q",
                      env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert failed.returncode != 0 and not out.exists()
    assert "1 finished shard(s) are kept in" in failed.stderr, failed.stderr[-2000:]
    staging = staging_path(str(out))
    assert sorted(n for n in os.listdir(staging) if n.endswith(".done")) == [
        "model-00001-of-00002.safetensors.done"]
    resumed = _torchrun("average", *paths, "-o", out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert any("1 of 2 shard(s) already done" in w for w in json.loads(resumed.stdout)["warnings"])
    files = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(out)) == files
    for name in files:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not os.path.exists(staging)


def test_an_interrupted_two_rank_dcp_run_is_resumed_under_torchrun(tmp_path):
    """A DCP output is staged as one safetensors shard per rank: rank 1's full disk keeps
    rank 0's; the torchrun command with --resume reduces only rank 1's share, and
    `dcp.load` reads what an uninterrupted run wrote."""
    import os

    from ckptavg.io.staging import staging_path

    paths = _inputs(tmp_path)
    assert _torchrun("average", *paths, "-o", tmp_path / "whole", "--dcp", "-q").returncode == 0
    hook = _rank1_disk_full(tmp_path)
    out = tmp_path / "out"
    failed = torchrun("ckptavg", "average", *paths, "-o", out, "--dcp", "-q",
                      env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert failed.returncode != 0 and not out.exists()
    assert "1 finished shard(s) are kept in" in failed.stderr, failed.stderr[-2000:]
    resumed = _torchrun("average", *paths, "-o", out, "--dcp", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert any("1 of 2 shard(s) already done" in w for w in json.loads(resumed.stdout)["warnings"])
    like = ckptavg.load(paths[0])[0]
    got, want = _dcp_load(out, like), _dcp_load(tmp_path / "whole", like)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not os.path.exists(staging_path(str(out))) and leftovers(tmp_path) == []


def test_a_sweep_under_two_ranks_is_bitwise_one_process(tmp_path):
    """--sweep under torchrun: each rank reads its share of the tensors of every input once
    and writes its shard of every window; each window folder equals one process's."""
    paths = _inputs(tmp_path, n=5)
    proc = _torchrun("average", *paths, "--sweep", "window=3", "-o", tmp_path / "dist", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ranks"] == 2 and len(summary["windows"]) == 3
    single = ckptavg.average(paths, tmp_path / "single", sweep="window=3")
    for w, s in zip(summary["windows"], single.windows):
        assert w["output"].endswith(s.output.rsplit("/", 1)[-1].removesuffix(".safetensors"))
        got, meta = ckptavg.load(w["output"])
        want, want_meta = ckptavg.load(s.output)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        for key in ("average.window", "average.weights", "average.recipe"):
            assert meta[key] == want_meta[key], key
        assert [e["content"] for e in json.loads(meta["average.inputs"])] == \
            [e["content"] for e in json.loads(want_meta["average.inputs"])]
        assert ckptavg.verify(w["output"]).status == "verified"
    assert leftovers(tmp_path) == []
    # a mistake on any rank: one line each (torchrun's own exit status is 1), nothing left
    proc = _torchrun("average", *paths, "--sweep", "window=9", "-o", tmp_path / "bad")
    assert proc.returncode != 0 and not (tmp_path / "bad").exists()
    assert proc.stderr.count("ckptavg: error: sweep 'window=9': no window of 9 inputs") == 2
    assert leftovers(tmp_path) == []


def test_a_nan_in_one_ranks_share_stops_both_ranks_with_its_line(tmp_path):
    """A NaN in a tensor of rank 1's share (fc.bias: `partition` gives the largest tensor,
    emb.weight, to rank 0 and the rest to rank 1) is found in rank 1's read pass while rank 0
    has finished its shard and waits for the exchange of records: both ranks stop with the
    line naming the input and the tensor (no hang), no output is made, and rank 0's shard is
    kept for --resume as one process keeps its finished shards."""
    paths = _inputs(tmp_path)
    state = ckptavg.load(paths[2])[0]
    state["fc.bias"][3] = float("nan")
    save_file(state, paths[2], {"train.epoch": "3", "model.arch": "x"})
    proc = _torchrun("average", *paths, "-o", tmp_path / "dist", timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ckptavg: error:")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all("fc.bias" in x and "epoch-0003" in x for x in lines), lines
    assert not (tmp_path / "dist").exists()


def test_a_rank_with_no_tensors_writes_no_shard(tmp_path):
    """One tensor, two ranks: rank 1's share is empty, so the folder has one shard (named
    1 of 1), bitwise one process's."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"epoch-{i + 1}.safetensors")
        save_file({"w": torch.full((5, 3), float(i))}, paths[-1], {"train.epoch": str(i + 1)})
    proc = _torchrun("average", *paths, "-o", tmp_path / "dist", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.load(open(tmp_path / "dist" / "model.safetensors.index.json"))
    assert index["weight_map"] == {"w": "model-00001-of-00001.safetensors"}
    ckptavg.average(paths, tmp_path / "single")
    assert torch.equal(ckptavg.load(tmp_path / "dist")[0]["w"], torch.full((5, 3), 1.0))
    assert (tmp_path / "dist" / "model-00001-of-00001.safetensors").read_bytes() == \
        (tmp_path / "single" / "model-00001-of-00001.safetensors").read_bytes()
    assert leftovers(tmp_path) == []


def test_a_nan_in_one_ranks_share_of_a_sweep_stops_both_ranks_and_leaves_nothing(tmp_path):
    """Under torchrun a sweep's windows are ShardedWriters sharing the ranks' agreements: a
    NaN that only rank 1 reads (fc.bias) stops both ranks with its line, whatever window
    each rank's writers were at, and no window folder nor the sweep's folder is left."""
    paths = _inputs(tmp_path, n=5)
    state = ckptavg.load(paths[3])[0]
    state["fc.bias"][0] = float("inf")
    save_file(state, paths[3], {"train.epoch": "4", "model.arch": "x"})
    proc = _torchrun("average", *paths, "--sweep", "window=2", "-o", tmp_path / "sw",
                     timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ckptavg: error:")]
    assert len(lines) == 2 and all("fc.bias" in x for x in lines), proc.stderr[-3000:]
    assert not (tmp_path / "sw").exists() and leftovers(tmp_path) == []
