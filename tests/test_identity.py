"""What an input is (issue #33, item 1): a local input is its device, inode, size, mtime and
ctime plus a content hash taken in the averaging read pass (xxh3-128 of its tensors). A
file rewritten in place between the fingerprint's sampled blocks is refused by --resume,
naming what changed; --into folds a different file whose sampled blocks agree, and skips a
touched but unchanged file only after its content hash confirms it."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

NUMEL = 600_000  # 2.4 MB per tensor: the fingerprint samples 4 blocks of 64 KiB of the file


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(NUMEL, generator=g), "b.bias": torch.randn(5, generator=g),
            "n": torch.tensor(3 + seed)}


def _unsampled_offset(path) -> int:
    """An offset of a tensor's bytes that the fingerprint does not read (between the blocks
    at 0 and size/3)."""
    size = os.path.getsize(path)
    off = size // 6
    assert 65536 < off < size // 3 - 8
    return off


def _edit_between_samples(path) -> None:
    """Change 4 bytes that the fingerprint does not sample, keeping the size."""
    off = _unsampled_offset(path)
    with open(path, "r+b") as f:
        f.seek(off)
        old = f.read(4)
        f.seek(off)
        f.write(bytes(b ^ 0x40 for b in old))


def _reference_content(state: dict) -> str:
    """The documented content hash (docs/formats.md), computed here from the tensors with
    zlib's CRC-32 and xxhash: per tensor, the CRC-32 of its bytes."""
    h = xxhash.xxh3_128()
    for key in sorted(state):
        t = state[key].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(f"{key}\0{str(t.dtype)[len('torch.'):]}\0{','.join(map(str, t.shape))}\0".encode())
        h.update(zlib.crc32(raw).to_bytes(4, "little"))
    return "xxh3-128:" + h.hexdigest()


def _entries(path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return json.loads(f.metadata()["average.inputs"])


def test_average_records_identity_and_the_content_hash_of_each_input(tmp_path):
    states = [_state(i) for i in range(3)]
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"ep-{i + 1}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    entries = _entries(out)
    for p, s, e in zip(paths, states, entries):
        st = os.stat(p)
        assert e["identity"] == [{"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                                  "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}]
        assert e["content"] == _reference_content(s)
    assert json.loads(proc.stdout)["content"] == [e["content"] for e in entries]
    got = load_file(str(out))
    want = (sum(s["a.weight"].double() for s in states) / 3).float()
    assert torch.equal(got["a.weight"], want)


def test_a_torch_output_records_the_same_content_hashes(tmp_path):
    """The hash is of the tensors: the same weights in a .pt give the same hash, and the
    torch output (its pickle patched in place, CRC included) loads with torch."""
    states = [_state(i) for i in range(2)]
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"ep-{i + 1}.pt"
        torch.save({"model_state_dict": s, "epoch": i + 1}, p)
        paths.append(p)
    out = tmp_path / "avg.pt"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(out, weights_only=True)  # checks every record's CRC-32
    entries = json.loads(loaded["metadata"]["average.inputs"])
    assert [e["content"] for e in entries] == [_reference_content(s) for s in states]
    import zipfile

    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


def test_resume_refuses_an_input_rewritten_between_the_sampled_blocks(tmp_path, monkeypatch):
    from tests.test_resume import _interrupted

    paths = []
    for i in range(3):
        p = tmp_path / f"epoch-{i + 1:04d}.safetensors"
        save_file(_state(i), str(p), metadata={"train.epoch": str(i + 1)})
        paths.append(str(p))
    out = tmp_path / "out"
    _interrupted(monkeypatch, paths, out, shards=1, shard_size=500_000)
    st = os.stat(paths[1])
    _edit_between_samples(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back
    proc = run_cli("average", *paths, "-o", out, "--shard-size", "500000", "--resume")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "epoch-0002.safetensors: changed since the interrupted run began" in line, line
    assert "change time" in line and "modification time" not in line, line
    assert not out.exists()


def test_into_folds_a_file_that_differs_only_between_the_sampled_blocks(tmp_path):
    first = tmp_path / "ep-1.safetensors"
    second = tmp_path / "ep-2.safetensors"
    save_file(_state(0), str(first))
    save_file(_state(0), str(second))
    _edit_between_samples(second)  # a frozen-backbone fine-tune: same size, same samples
    a, b = load_file(str(first)), load_file(str(second))
    assert not torch.equal(a["a.weight"], b["a.weight"])
    run = tmp_path / "run.safetensors"
    assert run_cli("average", first, "-o", run).returncode == 0
    proc = run_cli("average", second, "--into", run)
    assert proc.returncode == 0, proc.stderr
    from safetensors import safe_open

    with safe_open(str(run), "np") as f:
        assert f.metadata()["average.n"] == "2"
    got = load_file(str(run))["a.weight"]
    want = ((a["a.weight"].double() + b["a.weight"].double()) / 2).float()
    assert torch.equal(got, want)


def test_into_skips_a_touched_file_only_once_its_content_hash_agrees(tmp_path):
    first, second = tmp_path / "ep-1.safetensors", tmp_path / "ep-2.safetensors"
    save_file(_state(0), str(first))
    save_file(_state(1), str(second))
    run = tmp_path / "run.safetensors"
    assert run_cli("average", first, second, "-o", run).returncode == 0
    before = load_file(str(run))
    os.utime(first, ns=(1, 10**18))  # touched: another identity, the same tensors
    proc = run_cli("average", first, second, "--into", run, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped"] == [str(first), str(second)]
    assert all(torch.equal(before[k], v) for k, v in load_file(str(run)).items())


@pytest.mark.parametrize("record", ["old", "damaged"])
def test_into_without_a_content_hash_to_compare_is_one_line(tmp_path, record):
    """A running average whose record holds a fingerprint but no identity or content hash
    (an older ckptavg's) cannot tell a same-fingerprint file apart: one line, nothing
    written."""
    from ckptavg.io.files import fingerprint, open_source

    first, second = tmp_path / "ep-1.safetensors", tmp_path / "ep-2.safetensors"
    save_file(_state(0), str(first))
    save_file(_state(0), str(second))
    _edit_between_samples(second)
    fd, src = open_source(str(second))
    os.close(fd)
    entry = {"file": "x", "fingerprint": fingerprint([src])}
    if record == "damaged":
        entry["identity"] = "nonsense"
    run = tmp_path / "run.safetensors"
    save_file(_state(0), str(run), metadata={"average.n": "1",
                                             "average.inputs": json.dumps([entry])})
    before = open(run, "rb").read()
    proc = run_cli("average", second, "--into", run)
    assert proc.returncode == 1 and "no content hash" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert open(run, "rb").read() == before


def test_the_same_weights_in_two_containers_are_refused_as_duplicates(tmp_path):
    """Issue #34, item 3: a loop that ends with torch.save(model.state_dict(), 'final.pt')
    repeats its last epoch's weights; counted twice before, now refused naming both."""
    paths = []
    for i in range(1, 4):
        p = tmp_path / f"epoch_{i:03d}.pt"
        torch.save({"epoch": i, "model_state_dict": _state(i), "loss": 1.0 / i}, p)
        paths.append(p)
    final = tmp_path / "final.safetensors"
    save_file(_state(3), str(final))  # the last epoch's weights, another container
    out = tmp_path / "swa.safetensors"
    proc = run_cli("average", *paths, final, "-o", out)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds the same tensors as" in lines[0], proc.stderr
    assert "epoch_003.pt" in lines[0] and "final.safetensors" in lines[0]
    assert not out.exists()
    dry = run_cli("average", *paths, final, "--dry-run", "--json")  # refused in the plan too
    assert dry.returncode == 1 and "holds the same tensors as" in dry.stderr
    assert json.loads(dry.stdout)["exit_code"] == 1
    ok = run_cli("average", *paths, "--dry-run", "--json")
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["content"] == [_reference_content(_state(i)) for i in range(1, 4)]


def test_a_folder_output_records_content_hashes_also_when_resumed(tmp_path, monkeypatch):
    """The index of a sharded output holds every input's content hash; a run resumed after
    a kill takes the finished shards' digests from their records, so its index is the same,
    and its shards' headers hold no placeholder."""
    from tests.test_resume import _interrupted

    states = [_state(i) for i in range(3)]
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"epoch-{i + 1:04d}.safetensors"
        save_file(s, str(p), metadata={"train.epoch": str(i + 1)})
        paths.append(str(p))
    out = tmp_path / "out"
    _interrupted(monkeypatch, paths, out, shards=1, shard_size=500_000)
    proc = run_cli("average", *paths, "-o", out, "--shard-size", "500000", "--resume")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    entries = json.loads(index["metadata"]["average.inputs"])
    assert [e["content"] for e in entries] == [_reference_content(s) for s in states]
    for shard in out.glob("*.safetensors"):
        assert b"pending" not in shard.read_bytes()[:4096]


def test_snapshots_at_different_epochs_with_equal_weights_stay_distinct(tmp_path):
    """A run whose weights did not move between two epochs saved two snapshots, not one
    saved twice: averaged (each counted), not refused."""
    paths = []
    for i in (1, 2):
        p = tmp_path / f"epoch-{i}.safetensors"
        save_file(_state(0), str(p), metadata={"train.epoch": str(i)})
        paths.append(p)
    proc = run_cli("average", *paths, "-o", tmp_path / "o.safetensors")
    assert proc.returncode == 0, proc.stderr


def test_a_torch_tensor_that_is_part_of_its_record_is_hashed_from_its_bytes(tmp_path):
    """A view saved with its whole storage is not its record: its bytes are summed; a whole
    record takes the record's checked CRC-32. Both give the documented hash."""
    states, paths = [], []
    for i in range(2):
        base = torch.randn(1000, generator=torch.Generator().manual_seed(i))
        s = {"part": base[100:400], "whole": torch.randn(50) + i}
        p = tmp_path / f"v{i}.pt"
        torch.save(s, p)
        states.append({k: v.clone() for k, v in s.items()})
        paths.append(p)
    out = tmp_path / "o.safetensors"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert [e["content"] for e in _entries(out)] == [_reference_content(s) for s in states]


def test_whole_torch_records_are_not_summed_twice(tmp_path, monkeypatch):
    """A tensor that is a whole zip record takes the record's checked CRC-32 as its digest:
    none of a torch input's bytes are fed to the content hash a second time."""
    import ckptavg
    from ckptavg.engine import content

    fed = []
    real = content.ContentHashes.update
    monkeypatch.setattr(content.ContentHashes, "update",
                        lambda self, i, key, data: (fed.append(key), real(self, i, key, data)))
    states, paths = [_state(i) for i in range(2)], []
    for i, s in enumerate(states):
        p = tmp_path / f"ep-{i}.pt"
        torch.save({"model": {k: v for k, v in s.items() if v.is_floating_point()}}, p)
        paths.append(p)
    r = ckptavg.average(paths, tmp_path / "o.safetensors")
    assert fed == []
    assert r.content == [_reference_content({k: v for k, v in s.items() if v.is_floating_point()})
                         for s in states]
