import argparse
import decimal
import functools
import os

import pytest
import torch

from ckptavg.errors import CheckpointError
from ckptavg.io import open_checkpoint, sniff
from ckptavg.io.pt import find_state_dict

SD = {"conv.weight": torch.arange(6.0).reshape(2, 3), "conv.bias": torch.tensor([1.0, 2.0])}


class Evil:  # a global that is not on any allowlist
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def save(tmp_path, obj, name="c.pt", **kw):
    p = str(tmp_path / name)
    torch.save(obj, p, **kw)
    return p


def read_all(path, **kw):
    with open_checkpoint(path, **kw) as r:
        return {k: r.read(k).clone() for k in r.keys()}, r


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "module"])
def test_finds_nested_state_dict(tmp_path, wrapper):
    p = save(tmp_path, {wrapper: SD, "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}},
                                                     "param_groups": [{"lr": 0.1}]},
                        "epoch": 7})
    got, r = read_all(p)
    assert set(got) == set(SD)  # optimizer state never comes along
    for k in SD:
        assert torch.equal(got[k], SD[k])
    assert r.location == wrapper


def test_top_level_state_dict_and_lightning_style(tmp_path):
    got, _ = read_all(save(tmp_path, SD))
    assert set(got) == set(SD)
    light = {"state_dict": {f"model.{k}": v for k, v in SD.items()}, "epoch": 3,
             "hyper_parameters": {"lr": 0.1}}
    got, _ = read_all(save(tmp_path, light, "l.pt"), strip_prefix="model.")
    assert set(got) == set(SD)


def test_key_option_picks_ema_weights(tmp_path):
    ema = {k: v + 100 for k, v in SD.items()}
    p = save(tmp_path, {"state_dict": SD, "state_dict_ema": ema})
    got, _ = read_all(p, key="state_dict_ema")
    assert torch.equal(got["conv.bias"], ema["conv.bias"])
    with pytest.raises(CheckpointError, match="no entry 'nope'.*name the entry"):
        open_checkpoint(p, key="nope")


def test_wrapper_prefixes_stripped_only_when_all_keys_have_them(tmp_path):
    both = {f"_orig_mod.module.{k}": v for k, v in SD.items()}
    got, _ = read_all(save(tmp_path, both))
    assert set(got) == set(SD)
    mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
    got, _ = read_all(save(tmp_path, mixed, "m.pt"))
    assert set(got) == {"module.a", "b"}


def test_strip_prefix_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="prefix 'net.' to strip"):
        open_checkpoint(save(tmp_path, SD), strip_prefix="net.")


def test_refused_pickle_names_file_and_global(tmp_path):
    p = save(tmp_path, {"state_dict": SD, "evil": Evil()})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    msg = str(e.value)
    assert p in msg and "posix.system" in msg and "never run" in msg


class Config:  # a user's class: data only, but not on the allowlist
    def __init__(self):
        self.lr = 0.1


def test_a_users_class_is_never_imported_and_the_weights_still_read(tmp_path, monkeypatch):
    """A config object among the hyper-parameters: the tensors are plain, so they are read;
    the class is replaced by an inert stand-in (its module is not even importable here)."""
    p = save(tmp_path, {"state_dict": SD, "hyper_parameters": {"cfg": Config()},
                        "pytorch-lightning_version": "2.6.0", "epoch": 3})
    calls = []
    monkeypatch.setattr(Config, "__init__", lambda self: calls.append(1))
    monkeypatch.setattr(Config, "__setstate__", lambda self, s: calls.append(2), raising=False)
    with open_checkpoint(p) as r:
        got = {k: r.read(k).clone() for k in r.keys()}
        assert set(got) == set(SD) and all(torch.equal(got[k], SD[k]) for k in SD)
        assert r.position().epoch == 3
        # carried as plain values: the stand-in's fields become a dict
        assert r.extras() == {"pytorch-lightning_version": "2.6.0",
                              "hyper_parameters": {"cfg": {"lr": 0.1}}}
        assert r.dropped_extras == ()
        assert any("Config carried as a dict" in n for n in r.extras_notes)
    assert calls == []


def test_a_standard_library_global_that_runs_code_is_refused(tmp_path):
    p = save(tmp_path, {"state_dict": SD, "c": Config(), "d": functools.partial(print, 1)})
    with pytest.raises(CheckpointError, match="refused to unpickle the global functools.partial"):
        open_checkpoint(p)


def test_a_standard_library_data_holder_gets_a_stand_in(tmp_path):
    p = save(tmp_path, {"state_dict": SD, "d": decimal.Decimal("1.5")})
    with open_checkpoint(p) as r:
        assert r.keys() == list(SD)


def test_allowlisted_harmless_globals(tmp_path):
    import numpy as np

    obj = {"state_dict": SD, "args": argparse.Namespace(lr=0.1), "best": np.float64(0.93)}
    got, _ = read_all(save(tmp_path, obj))
    assert set(got) == set(SD)


def test_legacy_non_zip_format(tmp_path):
    p = save(tmp_path, {"model": SD}, _use_new_zipfile_serialization=False)
    assert sniff(p) == "torch-legacy"
    got, r = read_all(p)
    assert r.format == "torch-legacy"
    assert torch.equal(got["conv.weight"], SD["conv.weight"])


def test_ties_are_detected(tmp_path):
    w = torch.randn(3, 3)
    got, r = read_all(save(tmp_path, {"emb.weight": w, "head.weight": w, "b": torch.ones(1)}))
    assert r.ties() == {"head.weight": "emb.weight"}


def test_ties_in_a_sharded_bin_folder_are_found_without_reading_a_tensor(tmp_path):
    """A Hugging Face .bin folder with a tie inside one shard (and a wrapper prefix on every
    key): the tie torch.load shows (one storage for two names), by the folder's public names;
    opening the folder reads no tensor record."""
    import json

    w = torch.randn(3, 3)
    parts = {"pytorch_model-00001-of-00002.bin": {"module.emb.weight": w,
                                                   "module.head.weight": w,
                                                   "module.b": torch.ones(1)},
             "pytorch_model-00002-of-00002.bin": {"module.c": torch.zeros(2)}}
    for name, part in parts.items():
        torch.save(part, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in parts.items() for k in part}}))
    loaded = torch.load(tmp_path / "pytorch_model-00001-of-00002.bin", weights_only=True)
    assert loaded["module.emb.weight"].data_ptr() == loaded["module.head.weight"].data_ptr()
    with open_checkpoint(tmp_path) as r:
        assert r.ties() == {"head.weight": "emb.weight"}
        assert all(not s.reader._tensors_of.records for s in r._shards)  # no record read yet
        assert torch.equal(r.read("head.weight"), w)


def test_metadata_from_pt(tmp_path):
    p = save(tmp_path, {"state_dict": SD, "metadata": {"train.epoch": "3", "n": 5}})
    with open_checkpoint(p) as r:
        assert r.metadata() == {"train.epoch": "3", "n": "5"}


def test_no_state_dict_found(tmp_path):
    p = save(tmp_path, {"a": {"b": 1}, "c": "x"})
    with pytest.raises(CheckpointError, match="no state dict found.*--key"):
        open_checkpoint(p)
    with pytest.raises(CheckpointError, match="not a dict"):
        find_state_dict([1, 2], None, "x.pt")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.pt"
    p.write_text("hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        open_checkpoint(str(p))
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(str(tmp_path / "missing.pt"))


def test_release_keeps_data_readable(tmp_path):
    big = {"w": torch.randn(1 << 18), "v": torch.randn(1 << 18)}
    p = save(tmp_path, big)
    with open_checkpoint(p) as r:
        a = r.read("w").clone()
        r.release("w")
        assert torch.equal(r.read("w"), a)  # pages fault back in from the file
        assert torch.equal(a, big["w"])


# ------------------------------------------------------------------ locate: reads with pread


def test_locate_points_at_the_tensor_bytes_in_the_file(tmp_path):
    """Each located extent, read straight from the file, is the tensor's bytes; a
    non-contiguous saved view is not located (it is read through its mapping)."""
    state = {"w": torch.randn(5, 7), "b": torch.arange(9, dtype=torch.int64),
             "h": torch.randn(3, 3, dtype=torch.float64), "t": torch.randn(4, 6).t()}
    p = save(tmp_path, {"epoch": 3, "state_dict": state, "optimizer": {"m": torch.ones(2)}})
    with open_checkpoint(p) as r, open(p, "rb") as f:
        for k in ("w", "b", "h"):
            ext = r.locate(k)
            want = state[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            f.seek(ext.offset)
            assert f.read(len(want)) == want, k
        assert r.locate("t") is None


def test_a_file_saved_in_the_other_byte_order_is_not_read_raw(tmp_path):
    """torch swaps the bytes of a file whose byteorder record is not this machine's as it
    loads it; its raw bytes are then not the tensor: such a file is never located, and the
    average is of the values torch loads."""
    import sys
    import zipfile

    import ckptavg

    other = "big" if sys.byteorder == "little" else "little"
    src = save(tmp_path, {"w": torch.tensor([1.0, 2.0, 3.0])}, name="native.pt")
    swapped = str(tmp_path / "swapped.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(swapped, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("/byteorder"):
                data = other.encode()
            elif "/data/" in item.filename:
                data = torch.frombuffer(bytearray(data), dtype=torch.float32).numpy() \
                    .byteswap().tobytes()
            zout.writestr(item, data)
    loaded = torch.load(swapped, mmap=True, weights_only=True)
    assert loaded["w"].tolist() == [1.0, 2.0, 3.0]  # torch swapped them back on load
    with open_checkpoint(swapped) as r:
        assert r.locate("w") is None
    # the two hold the same values: the content hashes of the read pass say so (issue #34)
    with pytest.raises(ckptavg.CkptavgError, match="holds the same tensors as"):
        ckptavg.average([swapped, src], tmp_path / "o.safetensors")
    got, _ = ckptavg.load(swapped)
    assert got["w"].tolist() == [1.0, 2.0, 3.0]


def test_a_bug_in_our_reading_code_is_a_traceback_not_a_damaged_file(tmp_path, monkeypatch):
    """KeyError/TypeError/AttributeError mean "damaged file" only when the file's content
    made torch or pickle raise them; raised by ckptavg's own code they are bugs."""
    import ckptavg.io.pt as pt
    from ckptavg.errors import CheckpointError

    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        def broken(*a, **k):
            raise TypeError("a bug of ours")

        monkeypatch.setattr(pt, "fd_path", broken)
        with pytest.raises(TypeError, match="a bug of ours"):
            pt.torch_load(str(path), fd, mmap=False)
        monkeypatch.undo()
        with open(path, "r+b") as f:  # now a file torch's unpickler chokes on
            f.truncate(40)
        with pytest.raises(CheckpointError):
            pt.torch_load(str(path), fd, mmap=False)
    finally:
        os.close(fd)
