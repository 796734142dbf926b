"""Torch outputs written without torch (io/torchzip.py): read back by torch's own loader
(weights_only, mmap), by Python's zipfile and pickle, compared with the safetensors output
and with float64 means computed here; records checked against their CRC-32 on every read."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ckptavg
from ckptavg.errors import CheckpointError
from ckptavg.io import open_checkpoint
from ckptavg.io.dtypes import standard
from ckptavg.io.torchzip import Pickle, TensorRecord, ZipStream, head_records, tail_records
from tests.conftest import ROOT, rezip, run_cli


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = torch.randn(64, 33, generator=g)
        out.append({
            "w": w, "tied": w,  # one storage: stays one in the output
            "b": torch.randn(33, generator=g).bfloat16(), "h": torch.randn(5, generator=g).half(),
            "d": torch.randn(4, generator=g).double(), "n": torch.tensor(i),
            "mask": torch.tensor([True, i % 2 == 0]), "empty": torch.zeros(0, 3),
        })
    return out


def _float64_mean(states):
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        else:
            out[k] = states[-1][k]
    return out


def _save_all(folder, states, wrap=lambda sd, i: {"state_dict": sd, "epoch": i}):
    paths = []
    for i, sd in enumerate(states):
        p = folder / f"e{i}.pt"
        torch.save(wrap(sd, i), p)
        paths.append(str(p))
    return paths


def test_pt_output_loads_with_torchs_defaults_and_equals_the_safetensors_output(tmp_path):
    states = _states()
    paths = _save_all(tmp_path, states)
    ckptavg.average(paths, tmp_path / "a.pt")
    ckptavg.average(paths, tmp_path / "a.safetensors")
    st = load_file(tmp_path / "a.safetensors")
    want = _float64_mean(states)
    for mmap in (False, True):
        out = torch.load(tmp_path / "a.pt", mmap=mmap)  # torch's default: weights_only=True
        sd = out["state_dict"]
        assert list(sd) == list(states[0])
        for k, v in want.items():
            if k == "tied":
                continue
            assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
            # bit for bit the safetensors output's bytes
            assert sd[k].view(-1).view(torch.uint8).numpy().tobytes() == \
                st[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k
        assert sd["tied"].untyped_storage().data_ptr() == sd["w"].untyped_storage().data_ptr()
        assert out["metadata"]["average.n"] == "3"
    # the float64 mean, rounded once, for float32 (exact) and within a unit for the others
    torch.testing.assert_close(sd["w"], want["w"], rtol=0, atol=0)
    assert zipfile.ZipFile(tmp_path / "a.pt").testzip() is None  # every CRC right


def test_pt_output_is_written_without_importing_torch(tmp_path):
    paths = _save_all(tmp_path, _states())
    out = tmp_path / "swa.pt"
    script = ("import sys\nfrom ckptavg.cli import main\n"
              "try:\n    main(['average', *sys.argv[2:], '-o', sys.argv[1], '-q'])\n"
              "except SystemExit as e:\n    assert not e.code, e.code\n"
              "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *paths], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["False"], proc.stderr
    assert torch.equal(torch.load(out)["state_dict"]["w"], _float64_mean(_states())["w"])


@pytest.mark.parametrize("entry", ["model_state_dict", "model", "state_dict"])
def test_the_inputs_entry_name_is_kept(tmp_path, entry):
    states = _states(2)
    paths = _save_all(tmp_path, states, lambda sd, i: {"epoch": i, entry: sd,
                                                       "optimizer_state_dict": {}})
    ckptavg.average(paths, tmp_path / "a.pt")
    out = torch.load(tmp_path / "a.pt")
    assert set(out) == {entry, "metadata"}
    torch.testing.assert_close(out[entry]["w"], _float64_mean(states)["w"], rtol=0, atol=0)


def test_bin_output_is_a_plain_state_dict(tmp_path):
    states = _states(2)
    ckptavg.average(_save_all(tmp_path, states), tmp_path / "pytorch_model.bin")
    out = torch.load(tmp_path / "pytorch_model.bin", mmap=True)
    assert list(out) == list(states[0])


def test_timm_args_namespace_is_carried_as_a_dict(tmp_path):
    """timm's and fairseq's `args` (an argparse.Namespace) made the output unloadable with
    torch's default settings; now it is a dict, with a warning naming it."""
    states = _states(2)
    ns = argparse.Namespace(lr=0.1, model="resnet", sched={"name": "cosine"})
    paths = _save_all(tmp_path, states, lambda sd, i: {"state_dict": sd, "epoch": i,
                                                       "args": ns, "arch": "resnet",
                                                       "optimizer": {"lr": 0.1}})
    out = tmp_path / "avg.pth.tar"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "argparse.Namespace carried as a dict" in proc.stderr
    got = torch.load(out)  # weights_only=True
    assert got["args"] == {"lr": 0.1, "model": "resnet", "sched": {"name": "cosine"}}


def test_zip64_fields_are_read_by_torch_and_zipfile(tmp_path):
    """The zip64 code (every size and offset in zip64 fields), reached on a small file."""
    buf = io.BytesIO()
    z = ZipStream(buf, force_zip64=True)
    a = TensorRecord("0", standard("float32"), (2, 3), 24)
    f8 = TensorRecord("1", standard("float8_e5m2"), (3,), 3)
    p = Pickle().dumps({"state_dict": {"a": a, "alias": a, "f8": f8}})
    head_records(z, p)
    z.begin("data/0", 24)
    z.feed(np.arange(6, dtype=np.float32).tobytes()[:5])
    z.feed(np.arange(6, dtype=np.float32).tobytes()[5:])
    z.end()
    z.record("data/1", bytes([1, 2, 3]))
    tail_records(z, p)
    path = tmp_path / "z.pt"
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.getinfo("archive/data/0").file_size == 24
    for mmap in (False, True):
        sd = torch.load(path, mmap=mmap)["state_dict"]
        assert torch.equal(sd["a"], torch.arange(6, dtype=torch.float32).view(2, 3))
        assert sd["alias"] is sd["a"]
        assert sd["f8"].view(torch.uint8).tolist() == [1, 2, 3]
    with open_checkpoint(str(path)) as r:  # and ckptavg's own torch-free reader
        assert r.keys() == ["a", "alias", "f8"] and r.ties() == {"alias": "a"}


@pytest.mark.parametrize("value", [
    None, True, 0, 255, 256, 65536, -1, -(2**31), 2**31, 2**70, -(2**70), 1.5, float("inf"),
    "", "naïve ✓", b"", b"\x00\xff", [1, [2, (3, None)]], (), {"a": {1: 2.5}}, {1, 2},
    [list(range(1500))], {str(i): i for i in range(2100)},
])
def test_plain_values_pickle_as_pythons_own_unpickler_reads_them(value):
    assert pickle.loads(Pickle().dumps(value)) == value


def test_shared_and_cyclic_containers_stay_so():
    inner = [1, 2]
    cyc: list = [inner, inner]
    cyc.append(cyc)
    back = pickle.loads(Pickle().dumps({"x": cyc}))["x"]
    assert back[0] is back[1] and back[2] is back


def _record_offset(path, name):
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    raw = open(path, "rb").read()
    n_name, n_extra = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n_name + n_extra


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["first byte", "last byte", "view's storage"])
def test_a_record_whose_bytes_fail_its_crc_is_one_line_and_nothing_is_written(tmp_path, where):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 4, generator=g)
    paths = []
    for i in range(2):
        sd = {"w": torch.full((8,), 1.5), "rows": base[2:5] + 0 if where != "view's storage"
              else base[2:5], "x": torch.ones(3)}
        p = tmp_path / f"e{i}.pt"
        torch.save({"state_dict": sd}, p)
        paths.append(str(p))
    with zipfile.ZipFile(paths[1]) as z:
        names = sorted(n for n in z.namelist() if "/data/" in n)
    name = names[1] if where == "view's storage" else names[0]
    start = _record_offset(paths[1], name)
    size = zipfile.ZipFile(paths[1]).getinfo(name).file_size
    _flip(paths[1], start if where != "last byte" else start + size - 1)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fails its CRC-32 check" in lines[0] and paths[1] in lines[0]
    assert name in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["e0.pt", "e1.pt"]  # no output, no temp file
    # a dry run reads as the real run does: the same refusal, not a plan that passes
    dry = run_cli("average", *paths, "--dry-run")
    assert dry.returncode == 1 and "fails its CRC-32 check" in dry.stderr
    # and every other reader path: a whole load (bn-fix, eval, ckptavg.load)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        ckptavg.load(paths[1])


def test_a_torch_loaded_zip_is_checked_too(tmp_path):
    """A file torch's loader reads (a complex tensor beside the weights) is checked the
    same way through its mapped tensors' records."""
    paths = []
    for i in range(2):
        p = tmp_path / f"e{i}.pt"
        torch.save({"state_dict": {"w": torch.full((8,), 1.5 + i)},
                    "z": torch.ones(2, dtype=torch.complex64)}, p)
        paths.append(str(p))
    with zipfile.ZipFile(paths[1]) as z:
        name = next(n for n in z.namelist() if n.endswith("/data/0"))
    _flip(paths[1], _record_offset(paths[1], name) + 2)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        ckptavg.average(paths, tmp_path / "avg.safetensors")
    assert not (tmp_path / "avg.safetensors").exists()


def test_forged_zips_are_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"a": torch.ones(4), "b": torch.full((4,), 2.0)}}, good)
    cases = {}
    cases["missing record"] = (lambda n, d: None if n.endswith("/data/1") else d,
                               "which the zip does not hold")
    cases["short record"] = (lambda n, d: d[:4] if n.endswith("/data/0") else d,
                             "holds 4 bytes where data.pkl describes 16")
    for case, (edit, message) in cases.items():
        bad = tmp_path / f"{case}.pt"
        rezip(good, bad, edit)
        proc = run_cli("inspect", bad)
        assert proc.returncode == 1 and message in proc.stderr, (case, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1
    # overlapping records: the directory points record 1 at record 0's bytes
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        i0 = z.getinfo("good/data/0")
    pos = raw.find(b"PK\x01\x02")
    while raw[pos + 46:pos + 46 + len(b"good/data/1")] != b"good/data/1":
        pos = raw.find(b"PK\x01\x02", pos + 4)
    raw[pos + 42:pos + 46] = struct.pack("<I", i0.header_offset)
    bad = tmp_path / "overlap.pt"
    bad.write_bytes(bytes(raw))
    proc = run_cli("inspect", bad)
    assert proc.returncode == 1 and "overlap" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_zip64_fields_that_lie_are_one_line(tmp_path):
    """A zip64 extra field in the directory that moves a record's header elsewhere."""
    buf = io.BytesIO()
    z = ZipStream(buf, force_zip64=True)
    a = TensorRecord("0", standard("float32"), (4,), 16)
    p = Pickle().dumps({"a": a})
    head_records(z, p)
    z.record("data/0", np.ones(4, np.float32).tobytes())
    tail_records(z, p)
    raw = bytearray(buf.getvalue())
    # the directory entry's zip64 extra holds (size, size, offset) after the name
    pos = raw.rfind(b"archive/data/0")
    extra = pos + len(b"archive/data/0")
    assert struct.unpack("<HH", raw[extra:extra + 4]) == (1, 24)
    raw[extra + 20:extra + 28] = struct.pack("<Q", 7)  # the header "is" at byte 7
    path = tmp_path / "lie.pt"
    path.write_bytes(bytes(raw))
    proc = run_cli("inspect", path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "where no record begins" in proc.stderr


@pytest.mark.slow
def test_an_output_past_4_gib_loads_with_torch(tmp_path):
    """A real zip64 output: one float32 tensor of 4 GiB + 28 bytes, averaged from two."""
    n = (1 << 30) + 7
    for i in range(2):
        torch.save({"state_dict": {"w": torch.full((n,), float(i)), "b": torch.ones(3)}},
                   tmp_path / f"e{i}.pt")
    out = tmp_path / "avg.pt"
    ckptavg.average([tmp_path / "e0.pt", tmp_path / "e1.pt"], out, threads=1)
    for f in ("e0.pt", "e1.pt"):
        os.unlink(tmp_path / f)
    sd = torch.load(out, mmap=True)["state_dict"]
    assert sd["w"].shape == (n,) and float(sd["w"][0]) == 0.5 and float(sd["w"][-1]) == 0.5
    assert torch.equal(sd["b"], torch.ones(3))
    with zipfile.ZipFile(out) as z:
        assert z.getinfo("archive/data/0").file_size == 4 * n
