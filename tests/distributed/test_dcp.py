"""torch.distributed.checkpoint folders written by 2 real ranks (gloo, 127.0.0.1), read with
no process group; DCP's pickled .metadata admits only DCP's own classes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import ckptavg
from ckptavg.errors import CheckpointError
from ckptavg.options import Selection
from tests.conftest import ROOT
from tests.distributed.conftest import torchrun
from tests.interop.conftest import assert_matches, float64_mean


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    proc = torchrun(os.path.join(ROOT, "tests", "distributed", "write_dcp.py"), out, module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_sharded_dcp_checkpoints_average_like_their_full_tensors(dcp_run, tmp_path):
    folders = [dcp_run / f"step-{e}00" for e in (1, 2, 3)]
    assert len([f for f in os.listdir(folders[0]) if f.endswith(".distcp")]) == 2  # two ranks
    r = ckptavg.average(folders, tmp_path / "avg.safetensors", selection=Selection(from_step=200))
    assert r.steps == [200, 300]
    got, _ = ckptavg.load(tmp_path / "avg.safetensors")
    fulls = [torch.load(dcp_run / f"full-{e}.pt", weights_only=True) for e in (2, 3)]
    assert_matches(got, float64_mean(fulls))


def test_inspect_names_the_entries(dcp_run):
    info = ckptavg.inspect(dcp_run / "step-100")
    assert info.format == "dcp" and info.location == "model" and info.other_entries == ["optim"]
    assert [k.key for k in info.keys] == ["layer.weight", "layer.bias", "bn.num_batches_tracked"]


def test_metadata_naming_code_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    (d / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="refused to unpickle the global posix.system"):
        ckptavg.inspect(d)
    assert not marker.exists()


def test_a_missing_chunk_file_is_named(dcp_run, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(dcp_run / "step-100", d)
    os.unlink(d / "__1_0.distcp")
    with pytest.raises(CheckpointError, match="__1_0.distcp: no such file"):
        ckptavg.inspect(d)


def test_two_ranks_average_dcp_inputs_like_one_process(dcp_run, tmp_path):
    """DCP folders (written by 2 ranks) averaged by 2 other ranks: each reads only its
    tensors' chunks; every tensor equals the single-process average bitwise."""
    folders = [dcp_run / f"step-{e}00" for e in (1, 2, 3)]
    proc = torchrun("ckptavg", "average", *folders, "-o", tmp_path / "dist", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckptavg.average(folders, tmp_path / "single.safetensors")
    got, _ = ckptavg.load(tmp_path / "dist")
    want, _ = ckptavg.load(tmp_path / "single.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_dcp_checkpoints_of_different_layouts_average_exactly(dcp_run, tmp_path):
    """A 2-rank checkpoint (DTensor Shard(0) over two .distcp files) averaged with one that
    one process saved whole (one .distcp): each tensor is assembled from its chunks, so the
    mean is exact. (Megatron's merge refuses checkpoints of different layouts.)"""
    import torch.distributed.checkpoint as dcp

    full = torch.load(dcp_run / "full-1.pt", weights_only=True)
    other = {k: v * 3 + 1 if v.is_floating_point() else v for k, v in full.items()}
    one = tmp_path / "one-process"
    dcp.save({"model": other}, checkpoint_id=str(one), no_dist=True)
    assert len([f for f in os.listdir(one) if f.endswith(".distcp")]) == 1
    two = dcp_run / "step-200"
    r = ckptavg.average([two, one], tmp_path / "avg.safetensors")
    assert r.n == 2
    got, _ = ckptavg.load(tmp_path / "avg.safetensors")
    assert_matches(got, float64_mean([torch.load(dcp_run / "full-2.pt", weights_only=True), other]))
