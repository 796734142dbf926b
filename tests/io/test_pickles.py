"""One policy for what a torch file's pickle may name (io/pickles.py): code-running globals
refused by name whatever the protocol, nesting or reader; anything else an inert stand-in,
carried into outputs as plain values."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ckptavg
from ckptavg.errors import CheckpointError
from ckptavg.io import open_checkpoint
from ckptavg.io.pickles import Opaque, carry, left_out, stand_in
from tests.conftest import ROOT, rezip

MARK = "ZZMARKZZ"


def _with_payload(tmp_path, payload: bytes, nest: int = 0, protocol: int = 4, name="x.pt"):
    """A torch file whose `cfg` entry (nested `nest` lists deep) is `payload`: pickle opcodes
    that push one object, spliced where torch.save wrote a marker string."""
    cfg: object = MARK
    for _ in range(nest):
        cfg = [cfg]
    p = tmp_path / name
    torch.save({"state_dict": {"w": torch.ones(3)}, "cfg": cfg}, p, pickle_protocol=protocol)
    marker = b"\x8c" + bytes([len(MARK)]) + MARK.encode()

    def splice(name: str, data: bytes) -> bytes:
        if not name.endswith("data.pkl"):
            return data
        assert data.count(marker) == 1
        data = data.replace(marker, payload)
        if data[2:3] == b"\x95":  # protocol 4's one frame: its length changed
            size = int.from_bytes(data[3:11], "little") + len(payload) - len(marker)
            data = data[:3] + size.to_bytes(8, "little") + data[11:]
        return data

    rezip(p, p, splice)
    return str(p)


def _stack_global(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: module name STACK_GLOBAL, one string argument, REDUCE."""
    def s(t):
        return b"\x8c" + bytes([len(t)]) + t.encode()
    return s(module) + s(name) + b"\x93" + s(arg) + b"\x85R"


def _global(module: str, name: str, arg: str) -> bytes:
    """Protocol 0-2 style: GLOBAL 'module\\nname', one string argument, REDUCE."""
    return (b"c" + module.encode() + b"\n" + name.encode() + b"\n"
            + b"\x8c" + bytes([len(arg)]) + arg.encode() + b"\x85R")


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "getattr"), ("importlib", "import_module"),
    ("pickle", "loads"), ("copyreg", "_reconstructor"), ("runpy", "run_path"),
    ("functools", "partial"),
])
@pytest.mark.parametrize("opcode", ["STACK_GLOBAL", "GLOBAL"])
@pytest.mark.parametrize("nest", [0, 40])
def test_code_running_globals_are_refused_by_name(tmp_path, module, name, opcode, nest):
    payload = (_stack_global if opcode == "STACK_GLOBAL" else _global)(module, name, "true")
    p = _with_payload(tmp_path, payload, nest)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    msg = str(e.value)
    assert f"refused to unpickle the global {module}.{name}" in msg and p in msg
    assert "\n" not in msg


def test_refusal_through_the_cli_is_one_line_and_runs_nothing(tmp_path):
    flag = tmp_path / "ran"
    p = _with_payload(tmp_path, _stack_global("os", "system", f"touch {flag}"))
    out = tmp_path / "avg.pt"
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", p, p.replace("x.pt", "x.pt"),
                           "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "os.system" in proc.stderr
    assert not flag.exists() and not out.exists()


def test_a_legacy_file_naming_code_is_refused_by_name_too(tmp_path):
    class Evil:
        def __reduce__(self):
            return (subprocess.Popen, (["true"],))

    p = tmp_path / "legacy.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cfg": Evil()}, p,
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused to unpickle the global subprocess.Popen"):
        open_checkpoint(str(p))


@dataclasses.dataclass
class Hyper:
    lr: float = 0.1
    tags: tuple = ("a",)


def test_classes_and_numpy_values_are_read_without_torch_and_carried_plain(tmp_path):
    """A user's dataclass, a Namespace, numpy scalars, a path: the weights are read by the
    torch-free reader; a .pt output holds them as plain values (loads with weights_only)."""
    import pathlib

    hp = {"cfg": Hyper(), "args": argparse.Namespace(depth=3), "best": np.float32(0.5),
          "n": np.int64(7), "root": pathlib.PurePosixPath("/data/x")}
    paths = []
    for i in range(2):
        p = tmp_path / f"e{i}.ckpt"
        torch.save({"state_dict": {"w": torch.full((3,), float(i))}, "hyper_parameters": hp,
                    "pytorch-lightning_version": "2.6.0", "epoch": np.int64(i)}, p)
        paths.append(str(p))
    out = tmp_path / "avg.ckpt"
    script = ("import sys, ckptavg\nr = ckptavg.average(sys.argv[2:], sys.argv[1])\n"
              "print('torch' in sys.modules)\nprint(r.epochs)\nfor w in r.warnings: print(w)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out), *paths], cwd=ROOT,
                          capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["False", "[0, 1]"], proc.stderr
    assert any("Hyper carried as a dict" in w for w in lines[2:])
    got = torch.load(out)  # weights_only=True
    assert got["hyper_parameters"] == {"cfg": {"lr": 0.1, "tags": ("a",)}, "args": {"depth": 3},
                                       "best": 0.5, "n": 7, "root": "/data/x"}
    assert torch.equal(got["state_dict"]["w"], torch.full((3,), 0.5))


def test_weights_are_never_read_from_a_stand_in(tmp_path):
    p = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), p)  # a whole module, not a state dict
    with pytest.raises(CheckpointError, match="Linear object, not a dict of tensors"):
        open_checkpoint(str(p))


def test_carry_against_hand_built_stand_ins():
    ns = stand_in("argparse", "Namespace")()
    ns.__setstate__({"lr": 0.1, "inner": stand_in("m", "Unknown")(1, 2)})
    value, notes = carry({"a": ns, "b": [stand_in("m", "Unknown")()], "c": (1, "x")})
    assert value == {"a": {"lr": 0.1}, "b": [None], "c": (1, "x")}
    assert "argparse.Namespace carried as a dict" in notes
    assert any("m.Unknown left out" in n for n in notes)
    deep: list = []
    node = deep
    for _ in range(500):
        node.append([])
        node = node[0]
    value, notes = carry(deep)
    assert left_out(value) and "nested more than" in notes[0]
    assert isinstance(ns, Opaque) and repr(ns) == "<argparse.Namespace, not imported>"


def test_an_average_output_is_read_back_by_ckptavg_unchanged(tmp_path):
    """The written .pt, read by ckptavg's torch-free reader: keys, dtypes, bytes."""
    g = torch.Generator().manual_seed(1)
    states = [{"a": torch.randn(5, generator=g).bfloat16(), "i": torch.tensor(i)}
              for i in range(2)]
    paths = []
    for i, sd in enumerate(states):
        p = tmp_path / f"e{i}.pt"
        torch.save(sd, p)
        paths.append(str(p))
    ckptavg.average(paths, tmp_path / "avg.pt")
    state, meta = ckptavg.load(tmp_path / "avg.pt")
    want = torch.load(tmp_path / "avg.pt")  # bare in, bare out
    assert meta["average.n"] == "2" and os.path.getsize(tmp_path / "avg.pt") > 0
    assert all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_legacy_pickle_of_any_protocol_is_refused_naming_its_global(tmp_path, protocol):
    """Issue #33, item 8: torch's unpickler stops at protocol 4's FRAME before it names the
    global; the refusal still names it (read with pickletools, nothing run)."""
    import os as _os
    import pickle as _pickle

    from tests.conftest import run_cli

    class Evil:
        def __reduce__(self):
            return (_os.system, ("true",))

    p = tmp_path / f"legacy{protocol}.pt"
    p.write_bytes(_pickle.dumps({"w": Evil()}, protocol=protocol))
    proc = run_cli("inspect", p)
    assert proc.returncode == 1, proc.stderr
    assert "refused to unpickle the global posix.system" in proc.stderr, proc.stderr
