"""Torch files described without torch (pt.read_structure): every tensor's dtype, shape,
ties and bytes against what torch.load itself gives; anything else left to torch."""

import collections
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from ckptavg.errors import CheckpointError
from ckptavg.io import open_checkpoint
from ckptavg.io.files import OpenFile
from ckptavg.io.pt import TensorRef, read_structure
from tests.conftest import rezip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _structure(path):
    file, _ = OpenFile.of(str(path))
    try:
        return read_structure(str(path), file)
    finally:
        file.close()


def _states():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    sd = m.state_dict()  # an OrderedDict with _metadata
    sd.update({
        "bf": torch.randn(7, generator=g).bfloat16(), "h": torch.randn(3, generator=g).half(),
        "d": torch.randn(2, 2, generator=g).double(), "f8": torch.randn(9, generator=g).to(
            torch.float8_e5m2), "b": torch.tensor([True, False]), "i8": torch.tensor([-3], dtype=torch.int8),
        "row": base[2], "rows": base[1:4], "same": base, "alias": base,  # one storage
        "p": torch.nn.Parameter(torch.ones(3)), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4), "t": base.t(),  # not contiguous
    })
    return sd


@pytest.mark.parametrize("layout", ["plain", "lightning", "nested"])
def test_described_tensors_are_torchs_own(tmp_path, layout):
    sd = _states()
    obj = {"plain": sd, "lightning": {"epoch": 4, "global_step": 80, "state_dict": sd,
                                      "optimizer_states": [{"state": {0: {"m": torch.ones(2)}}}],
                                      "hyper_parameters": {"lr": 0.1, "tags": {"a", "b"}, "raw": b"\x00\x01"}},
           "nested": {"model": {"ema": sd, "step": 3}, "epoch": 2}}[layout]
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    desc = _structure(p)
    assert desc is not None
    loaded = torch.load(p, weights_only=True)
    inner = {"plain": lambda o: o, "lightning": lambda o: o["state_dict"],
             "nested": lambda o: o["model"]["ema"]}[layout]
    want, got = inner(loaded), inner(desc)
    assert list(got) == list(want)
    raw = p.read_bytes()
    for k, t in want.items():
        ref = got[k]
        assert isinstance(ref, TensorRef)
        assert ref.shape == tuple(t.shape) and ref.dtype == t.dtype, k
        assert ref.stride == t.stride() and ref.offset == t.storage_offset(), k
        if t.numel() and t.is_contiguous():
            n = t.numel() * t.element_size()
            assert raw[ref.file_offset():ref.file_offset() + n] == \
                t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k
    if layout == "lightning":
        assert desc["hyper_parameters"] == {"lr": 0.1, "tags": {"a", "b"}, "raw": b"\x00\x01"}
        assert desc["epoch"] == 4


def test_reader_without_torch_equals_reader_with_torch(tmp_path):
    """The same file through the torch-free description and through torch's loader (forced
    by a complex tensor beside the weights): keys, specs, ties, located bytes, scalars."""
    sd = _states()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"state_dict": sd, "epoch": 7}, a)
    torch.save({"state_dict": sd, "epoch": 7, "rng": torch.ones(2, dtype=torch.complex64)}, b)
    assert _structure(a) is not None and _structure(b) is None
    with open_checkpoint(str(a)) as ra, open_checkpoint(str(b)) as rb:
        assert ra.keys() == rb.keys()
        assert ra.ties() == rb.ties() and ra.ties()  # the views of one storage
        assert ra.location == rb.location == "state_dict"
        for k in ra.keys():
            assert ra.info(k) == rb.info(k), k
            ea, eb = ra.locate(k), rb.locate(k)
            assert (ea is None) == (eb is None), k
            if ea is not None:
                n = ra.info(k).nbytes
                assert os.pread(ea.fd, n, ea.offset) == os.pread(eb.fd, n, eb.offset), k
            assert torch.equal(ra.read(k), rb.read(k)), k  # read loads it with torch
        assert ra.scalars()["epoch"] == 7.0


def test_numpy_values_and_classes_are_described_with_stand_ins(tmp_path):
    """numpy scalars and a class beside the weights no longer send the file to torch: they
    are inert stand-ins, and a numpy scalar still reads as its number."""
    p = tmp_path / "x.pt"
    torch.save({"state_dict": {"w": torch.ones(4)}, "n": np.int64(3), "metric": np.float64(0.75),
                "o": collections.Counter(a=1)}, p)
    desc = _structure(p)
    assert desc is not None and isinstance(desc["state_dict"]["w"], TensorRef)
    with open_checkpoint(str(p)) as r:
        assert r.scalars() == {"n": 3.0, "metric": 0.75}


@pytest.mark.parametrize("what", ["complex", "quantized", "compressed"])
def test_anything_else_is_left_to_torch(tmp_path, what):
    p = tmp_path / "x.pt"
    sd = {"w": torch.ones(4)}
    if what == "complex":
        sd["c"] = torch.ones(2, dtype=torch.complex64)
    elif what == "quantized":
        sd["q"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    torch.save(sd, p)
    if what == "compressed":  # (another byte order is read, swapped: io/test_byteorder.py)
        q = tmp_path / "y.pt"
        with zipfile.ZipFile(p) as zin, zipfile.ZipFile(q, "w") as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                zout.writestr(item.filename, data, zipfile.ZIP_DEFLATED
                              if "/data/" in item.filename else zipfile.ZIP_STORED)
        p = q
    assert _structure(p) is None


def test_a_record_shorter_than_its_storage_is_one_line(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"w": torch.ones(4)}, p)
    rezip(p, p, lambda name, data: data[:8] if name.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"data/0 holds 8 bytes where data.pkl describes 16"):
        _structure(p)


def test_averaging_torch_files_never_imports_torch(tmp_path):
    g = torch.Generator().manual_seed(8)
    paths = []
    for i in range(3):
        p = tmp_path / f"epoch-{i}.pt"
        torch.save({"epoch": i, "model": {"w": torch.randn(1000, generator=g),
                                          "bf": torch.randn(10, generator=g).bfloat16(),
                                          "n": torch.tensor(i), "e": torch.zeros(0, 3),
                                          "ei": torch.zeros(0, dtype=torch.int64)}}, p)
        paths.append(str(p))
    out = tmp_path / "avg.safetensors"
    script = ("import sys\nfrom click.testing import CliRunner\nfrom ckptavg.cli import cli\n"
              f"r = CliRunner().invoke(cli, ['average', *{paths!r}, '-o', {str(out)!r}, '-q'])\n"
              "print(r.exit_code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == ["0", "False"], proc.stderr
    from safetensors.torch import load_file

    got = load_file(out)
    xs = [torch.load(p, weights_only=True)["model"] for p in paths]
    assert torch.equal(got["w"], ((xs[0]["w"].double() + xs[1]["w"].double()
                                   + xs[2]["w"].double()) / 3).float())
    assert got["n"].item() == 2 and got["e"].shape == (0, 3) and got["ei"].shape == (0,)


def test_a_forged_pickle_cannot_change_a_shared_dtype(tmp_path):
    """BUILD on `torch.float32` (a dtype the structure reader hands out): the file is left
    to torch, and the process's float32 is still 4 bytes."""
    from ckptavg.io import dtypes

    forged = (b"\x80\x02ctorch\nfloat32\nN}X\x08\x00\x00\x00itemsizeKcs\x86b.")
    p = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2)}, p)
    rezip(p, p, lambda name, data: forged if name.endswith("/data.pkl") else data)
    assert _structure(p) is None
    assert dtypes.float32.itemsize == 4


def test_inspect_never_imports_torch_and_lists_torchs_tensors(tmp_path):
    import json

    from safetensors.torch import save_file

    state = {"a.w": torch.randn(3, 2), "a.b": torch.zeros(4, dtype=torch.bfloat16),
             "n": torch.tensor(5)}
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "x.pt")
    save_file(state, str(tmp_path / "x.safetensors"))
    for name in ("x.pt", "x.safetensors"):
        script = ("import sys\nfrom click.testing import CliRunner\nfrom ckptavg.cli import cli\n"
                  f"r = CliRunner().invoke(cli, ['inspect', {str(tmp_path / name)!r}, '--json'])\n"
                  "print(r.output)\nprint('torch imported:', 'torch' in sys.modules)\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True)
        out, last = proc.stdout.rsplit("torch imported:", 1)
        assert last.strip() == "False", proc.stderr
        keys = {e["key"]: (e["shape"], e["dtype"]) for e in json.loads(out)["keys"]}
        assert keys == {k: (list(v.shape), str(v.dtype)[len("torch."):]) for k, v in state.items()}


def _deep(n):
    x = [1]
    for _ in range(n):
        x = [x]
    return x


@pytest.mark.parametrize("via", ["structure", "torch"])
@pytest.mark.parametrize("shape", ["deep", "cycle"])
def test_deep_or_cyclic_entries_are_read_and_not_carried(tmp_path, via, shape):
    """A file whose config entry nests 5000 deep or holds itself: the weights are read and
    averaged; the deep entry is left out of a .pt output, the cyclic one is carried (pickle
    keeps cycles); a metadata value that JSON cannot encode is left out. No RecursionError,
    no hang."""
    import ckptavg

    cfg = _deep(5000) if shape == "deep" else []
    if shape == "cycle":
        cfg.append(cfg)
    meta = {"ok": "yes", "bad": cfg}
    paths = []
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # for torch.save of the deep list
    try:
        for i in range(2):
            obj = {"state_dict": {"w": torch.full((3,), float(i))}, "cfg": cfg, "metadata": meta}
            if via == "torch":
                obj["rng"] = torch.ones(1, dtype=torch.complex64)  # torch's loader reads it
            p = tmp_path / f"e{i}.pt"
            torch.save(obj, p)
            paths.append(str(p))
    finally:
        sys.setrecursionlimit(limit)
    assert (_structure(paths[0]) is None) == (via == "torch")
    carried = shape == "cycle"
    with open_checkpoint(paths[0]) as r:
        assert r.keys() == ["w"] and ("cfg" in r.extras()) == carried
        assert r.dropped_extras == (() if carried else ("cfg",))
        assert r.metadata() == {"ok": "yes"}
    out = tmp_path / "avg.pt"
    ckptavg.average(paths, out)
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["state_dict"]["w"], torch.full((3,), 0.5))
    assert ("cfg" in got) == carried
    if carried:
        assert got["cfg"][0] is got["cfg"]


def test_a_state_dict_entry_holding_itself_is_one_error(tmp_path):
    from ckptavg.errors import CheckpointError

    d = {"w": torch.ones(2), "x": 1}
    d["model"] = d
    p = tmp_path / "x.pt"
    torch.save(d, p)
    with pytest.raises(CheckpointError, match="nested more than"):
        open_checkpoint(str(p))
