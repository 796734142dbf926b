"""Torch files written on a big-endian machine (issue #33, item 5): their `byteorder` record
says `big` and every storage holds big-endian values. ckptavg reads them exactly (swapped
in numpy as they are read), checked against torch's own loader and against the values the
test wrote; never a value read in the wrong order."""

from __future__ import annotations

import sys
import zipfile

import pytest
import torch

import ckptavg
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="made on a little-endian host")


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "a": torch.tensor([1.5, -2.25], dtype=torch.float64) * (i + 1),
        "b": torch.tensor([1002 + i, -7], dtype=torch.int64),
        "c": torch.randn(3, 5, generator=g),
        "d": torch.randn(4, generator=g).to(torch.bfloat16),
        "e": torch.randn(6, generator=g).to(torch.float16),
        "f": torch.tensor([3, 1, 2], dtype=torch.int32) + i,
        "g": torch.tensor([5, 6], dtype=torch.uint8),
    }


def save_big_endian(state: dict, path) -> None:
    """A torch file as a big-endian machine writes it: each storage's elements byte-swapped
    and the `byteorder` record `big` (storages are numbered in the order pickled)."""
    little = str(path) + ".little"
    torch.save(state, little)
    sizes = {str(i): t.element_size() for i, t in enumerate(state.values())}
    with zipfile.ZipFile(little) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            parts = info.filename.split("/")
            if parts[-1] == "byteorder":
                data = b"big"
            elif len(parts) >= 2 and parts[-2] == "data" and sizes.get(parts[-1], 1) > 1:
                n = sizes[parts[-1]]
                data = b"".join(data[k:k + n][::-1] for k in range(0, len(data), n))
            zout.writestr(info.filename, data)


def _files(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"ep-{i + 1}.pt"
        save_big_endian(_state(i), p)
        paths.append(p)
    return paths


def test_torch_reads_the_forged_big_endian_file_as_written(tmp_path):
    """The construction is right: torch's loader gives back the tensors saved."""
    (p,) = _files(tmp_path, 1)
    loaded = torch.load(p, weights_only=True)
    for k, v in _state(0).items():
        assert torch.equal(loaded[k], v), k


def test_load_of_a_big_endian_file_is_exact(tmp_path):
    (p,) = _files(tmp_path, 1)
    got, _ = ckptavg.load(p)
    for k, v in _state(0).items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_average_of_big_endian_files_equals_the_float64_mean(tmp_path):
    paths = _files(tmp_path)
    out = tmp_path / "out.pt"
    proc = run_cli("average", *paths, "-o", out)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out, weights_only=True)
    got = got.get("state_dict", got)
    states = [_state(i) for i in range(3)]
    for k, v in states[0].items():
        if v.is_floating_point():
            want = (sum(s[k].double() for s in states) / 3).to(v.dtype)
        else:
            want = states[-1][k]  # integers: the newest input's value
        assert got[k].dtype == v.dtype and torch.equal(got[k], want), k


def test_an_averaged_models_count_in_a_big_endian_file_is_read_exactly(tmp_path):
    """AveragedModel's n_averaged (an int64 read alone, as a count) in the other byte order."""
    state = {"module.w": torch.tensor([1.5, 2.5]), "n_averaged": torch.tensor(5)}
    p = tmp_path / "swa.pt"
    save_big_endian(state, p)
    assert torch.load(p, weights_only=True)["n_averaged"].item() == 5  # the construction
    info = ckptavg.inspect(p)
    assert info.metadata["swa.n_averaged"] == "5"
