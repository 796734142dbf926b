import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptavg.errors import CheckpointError
from ckptavg.io import open_checkpoint
from ckptavg.io.folders import INDEX_NAME
from ckptavg.io.writer import SafetensorsWriter, ShardedWriter, TensorSpec, split_shards
from tests.conftest import known_state

ALL_DTYPES = {
    "f64": torch.arange(5, dtype=torch.float64) / 3,
    "f32": torch.randn(2, 3),
    "f16": torch.randn(4).half(),
    "bf16": torch.randn(4).bfloat16(),
    "i64": torch.tensor([1, -2, 3]),
    "i32": torch.tensor([7], dtype=torch.int32),
    "i8": torch.tensor([-1, 2], dtype=torch.int8),
    "u8": torch.tensor([255, 0], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
}


def test_reads_what_the_safetensors_library_writes(tmp_path):
    p = str(tmp_path / "a.safetensors")
    save_file(ALL_DTYPES, p, metadata={"k": "v"})
    with open_checkpoint(p) as r:
        assert r.format == "safetensors"
        assert set(r.keys()) == set(ALL_DTYPES)
        assert r.metadata() == {"k": "v"}
        for k, v in ALL_DTYPES.items():
            assert r.info(k).shape == tuple(v.shape)
            assert r.info(k).dtype == v.dtype
            got = r.read(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_writer_output_loads_in_safetensors_library(tmp_path):
    p = str(tmp_path / "out.safetensors")
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ALL_DTYPES.items()]
    w = SafetensorsWriter(p, specs, {"a": "1"})
    for k, v in ALL_DTYPES.items():
        w.write(k, v)
    w.close()
    back = load_file(p)
    for k, v in ALL_DTYPES.items():
        assert torch.equal(back[k], v), k
    from safetensors import safe_open

    with safe_open(p, "pt") as f:
        assert f.metadata() == {"a": "1"}
    assert os.stat(p).st_mode & 0o777 == 0o644


def test_sharded_roundtrip_and_hugging_face_layout(tmp_path):
    state = known_state(1)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    out = str(tmp_path / "model")
    w = ShardedWriter(out, specs, {"x": "y"}, shard_size=100)
    for k, v in state.items():
        w.write(k, v)
    w.close()
    index = json.load(open(os.path.join(out, INDEX_NAME)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert index["metadata"]["x"] == "y"
    with open_checkpoint(out) as r:
        assert r.format == "safetensors-sharded"
        assert r.metadata() == {"x": "y"}
        for k, v in state.items():
            assert torch.equal(r.read(k), v)
    merged = {}
    for s in shards:
        merged.update(load_file(os.path.join(out, s)))
    assert set(merged) == set(state)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_split_shards_respects_size():
    specs = [TensorSpec(str(i), (10,), torch.float32) for i in range(10)]  # 40 B each
    shards = split_shards(specs, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert split_shards(specs[:1], 1) == [specs[:1]]  # a tensor bigger than a shard still fits


def test_truncated_file_is_one_clear_error(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-50])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(str(p))


def test_folder_without_index_suggests_glob(tmp_path):
    with pytest.raises(CheckpointError, match=r"\*\.safetensors"):
        open_checkpoint(str(tmp_path))


def test_hf_single_file_folder(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(str(tmp_path)) as r:
        assert torch.equal(r.read("w"), torch.ones(2))


def test_header_length_that_looks_like_a_pickle_is_still_safetensors(tmp_path):
    from ckptavg.io import sniff

    # A header of 0x..80 bytes starts the file with 0x80, the pickle protocol marker.
    for pad in range(0, 300, 1):
        p = str(tmp_path / "a.safetensors")
        save_file({"w": torch.ones(1)}, p, metadata={"pad": "x" * pad})
        if open(p, "rb").read(1) == b"\x80":
            break
    else:
        pytest.fail("no header length with a 0x80 low byte found")
    assert sniff(p) == "safetensors"
    with open_checkpoint(p) as r:
        assert r.metadata()["pad"] == "x" * pad


def test_local_files_and_objects_implement_one_byte_source_protocol(tmp_path):
    """The formats read through `files.ByteSource` and record `files.SourceIdentity`: a
    local open file and an object in a store implement both the same way."""
    from ckptavg.io.files import ByteSource, OpenFile, SourceIdentity
    from ckptavg.io.remote import RemoteFile

    p = tmp_path / "x.safetensors"
    p.write_bytes(b"0123456789")
    f, src = OpenFile.of(str(p))
    try:
        assert isinstance(f, ByteSource) and isinstance(src, SourceIdentity)
        assert f.get(2, 3) == b"234"
    finally:
        f.close()
    for member in ("get", "get_many", "pread", "open", "extent", "number", "close", "identity",
                   "stamp", "changed", "reader"):
        assert callable(getattr(RemoteFile, member, None)) or isinstance(
            getattr(RemoteFile, member, None), property), member
    assert RemoteFile.remote is True and OpenFile.remote is False
