"""Lying files are refused, not believed: safetensors headers and shard indexes forged byte
by byte, torch state dicts with what cannot be averaged. Each ends as one line naming the
file, exit 1, and no output."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

import ckptavg
from ckptavg.errors import CheckpointError, OutputError
from tests.conftest import run_cli, write_safetensors


def forge(path, header: bytes | dict | str, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors file written byte by byte: 8-byte length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header + data)
    return str(path)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
GOOD = {"a": F32x2}
EIGHT = struct.pack("<2f", 1.0, 2.0)

FORGED = {
    "empty header": ({}, b"", "holds no tensors"),
    "zero-length header": (b"", b"", "header length 0|not a checkpoint"),
    "length past end": (json.dumps(GOOD).encode(), EIGHT, "header length"),
    "huge length": (b"{}", b"", "header length|not a checkpoint"),
    "not json": (b"{not json", b"", "invalid safetensors header"),
    "not an object": (b"[1, 2]", b"", "not a JSON object|not a checkpoint"),
    "deep nesting": (b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}", b"", "nested too deeply|not a tensor entry"),
    "duplicate names": ('{"a": ' + json.dumps(F32x2) + ', "a": ' + json.dumps(F32x2) + '}', EIGHT, "appears twice"),
    "overlap": ({"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, EIGHT, "overlaps"),
    "hole": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, EIGHT, "hole"),
    "trailing bytes": (GOOD, EIGHT + b"xxxx", "trailing bytes"),
    "truncated data": (GOOD, EIGHT[:4], "truncated"),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, EIGHT, "needs 12"),
    "8 TB claim": ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, EIGHT, "tensors end"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 8]}}, EIGHT, "unknown dtype"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, EIGHT, "shape"),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, EIGHT, "shape"),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, EIGHT, "data_offsets"),
    "reversed offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, EIGHT, "data_offsets"),
    "entry not object": ({"a": [1, 2]}, EIGHT, "not a tensor entry"),
    "extra field": ({"a": {**F32x2, "evil": 1}}, EIGHT, "not a tensor entry"),
    "metadata not str": ({"__metadata__": {"k": 1}, **GOOD}, EIGHT, "__metadata__"),
    "metadata a list": ({"__metadata__": ["x"], **GOOD}, EIGHT, "__metadata__"),
    "not utf-8": (b'{"\xff": 1}', b"", "UTF-8"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_header_is_refused_by_every_entry_point(tmp_path, name):
    header, data, message = FORGED[name]
    length = {"length past end": 10**6, "huge length": 2**60}.get(name)
    p = forge(tmp_path / "f.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=message) as e:
        ckptavg.open_checkpoint(p)
    assert str(e.value).startswith(p) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        ckptavg.inspect(p)  # inspect believes nothing average would refuse
    with pytest.raises(CheckpointError):
        ckptavg.average([p], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("name", ["overlap", "duplicate names", "8 TB claim"])
def test_forged_header_subprocess_one_line(tmp_path, name):
    header, data, _ = FORGED[name]
    good = write_safetensors(tmp_path, 1)[0]
    p = forge(tmp_path / "f.safetensors", header, data)
    for cmd in (["average", good, p, "-o", tmp_path / "o.safetensors"], ["inspect", p]):
        proc = run_cli(*cmd)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ckptavg: error: {p}: invalid safetensors header")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_valid_forged_file_is_read_exactly(tmp_path):
    """The validator is not a refuse-everything: an exact hand-written file reads back."""
    header = {"__metadata__": {"k": "v"}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
              "a": F32x2, "z": {"dtype": "I64", "shape": [0], "data_offsets": [12, 12]}}
    p = forge(tmp_path / "ok.safetensors", header, EIGHT + struct.pack("<f", 3.0))
    state, meta = ckptavg.load(p)
    assert state["a"].tolist() == [1.0, 2.0] and state["b"].tolist() == [3.0]
    assert state["z"].shape == (0,) and meta == {"k": "v"}


def _sharded(tmp_path, index: dict, shards: dict[str, dict]) -> str:
    folder = tmp_path / "sh"
    folder.mkdir()
    for name, tensors in shards.items():
        from safetensors.torch import save_file

        save_file(tensors, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("case,message", [
    ("traversal", "not a shard file name"),
    ("absolute", "not a shard file name"),
    ("non-string", "not a shard file name"),
    ("missing tensor", "does not hold it"),
    ("unlisted tensor", "does not place"),
    ("no weight_map", "no weight_map"),
    ("not json", "not JSON"),
])
def test_forged_shard_index_is_refused(tmp_path, case, message):
    t = {"a": torch.ones(2), "b": torch.zeros(3)}
    secret = tmp_path / "secret.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, secret)
    wm = {"a": "s1.safetensors", "b": "s1.safetensors"}
    index = {"weight_map": wm}
    if case == "traversal":
        wm["a"] = "../secret.safetensors"
    elif case == "absolute":
        wm["a"] = str(secret)
    elif case == "non-string":
        wm["a"] = 7
    elif case == "missing tensor":
        wm["c"] = "s1.safetensors"
    elif case == "unlisted tensor":
        del wm["b"]
    elif case == "no weight_map":
        index = {"metadata": {}}
    folder = _sharded(tmp_path, index, {"s1.safetensors": t})
    if case == "not json":
        (tmp_path / "sh" / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=message):
        ckptavg.open_checkpoint(folder)


@pytest.mark.parametrize("case,message", [
    ("non-string key", "non-string key"),
    ("sparse", "sparse_coo tensor"),
    ("meta", "meta tensor"),
    ("quantized", "quantized tensor"),
    ("complex", "complex dtype"),
])
def test_torch_state_dicts_with_unaveragable_entries(tmp_path, case, message):
    state = {"w": torch.ones(2)}
    if case == "non-string key":
        state[3] = torch.ones(2)
    elif case == "sparse":
        state["s"] = torch.eye(3).to_sparse()
    elif case == "meta":
        state["m"] = torch.empty(2, device="meta")
    elif case == "quantized":
        state["q"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    elif case == "complex":
        state["c"] = torch.ones(2, dtype=torch.complex64)
    p = tmp_path / "x.pt"
    torch.save({"state_dict": state}, p)
    proc = run_cli("average", p, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(p) in lines[0]


def test_refused_pickle_names_the_global_and_torch_stays_quiet(tmp_path):
    p = tmp_path / "evil.pt"
    marker = tmp_path / "MARKER"
    # A pickle whose REDUCE would call os.system: written by hand, never loaded unsafely here.
    payload = (b"\x80\x02cposix\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
    import zipfile

    with zipfile.ZipFile(p, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")
        z.writestr("evil/byteorder", "little")
    proc = run_cli("average", p, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no torch warning leaks
    assert "refused to unpickle the global posix.system" in lines[0]
    assert not marker.exists()


def test_metadata_key_headed_for_safetensors_is_refused(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"__metadata__": torch.ones(2), "w": torch.ones(2)}, p)
    with pytest.raises(OutputError, match="__metadata__"):
        ckptavg.average([p], tmp_path / "o.safetensors")
    assert os.listdir(tmp_path) == ["x.pt"]
    ckptavg.average([p], tmp_path / "o.pt")  # a .pt output has no such reserved name
