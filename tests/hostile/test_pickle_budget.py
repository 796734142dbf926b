"""Bounded work on untrusted pickles (issue #33, item 4): a non-weight entry that expands
past the budget through shared references (tuples, lists, dicts 40 levels deep: 2**40
paths from a 2 KB file), nests too deep, or holds an integer a torch output cannot hold is
left out with a warning naming it; the weights are still averaged, exactly. Each run is
given a generous timeout only as a hang guard (before the fix, these ran past 40 s and 9 GB)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli


def _shared(kind: str, depth: int = 40):
    x: object = (1, 2)
    for _ in range(depth):
        x = {"tuple": (x, x), "list": [x, x], "dict": {"a": x, "b": x}}[kind]
    return x


def _deep(depth: int = 5000):
    x: object = []
    for _ in range(depth):
        x = [x]
    return x


ENTRIES = {
    "tuple bomb in hyper_parameters": ("hyper_parameters", {"x": _shared("tuple")}),
    "list bomb in hyper_parameters": ("hyper_parameters", {"x": _shared("list")}),
    "dict bomb in hyper_parameters": ("hyper_parameters", {"x": _shared("dict")}),
    "3000-bit integer in hyper_parameters": ("hyper_parameters", {"big": 2**3000}),
    "list bomb in metadata": ("metadata", {"a": _shared("list")}),
    "tuple bomb in metadata": ("metadata", {"a": _shared("tuple")}),
    "deep list in metadata": ("metadata", {"a": _deep(90)}),
}


def _write(tmp_path, where: str, entry: dict):
    paths = []
    for i in range(2):
        state = {"state_dict": {"w": torch.full((3,), float(i + 1)),
                                "n": torch.tensor([7 + i])},
                 where: entry, "epoch": i, "global_step": 10 * (i + 1)}
        if where == "hyper_parameters":
            state["pytorch-lightning_version"] = "2.0.0"
        p = tmp_path / f"ep-{i}.ckpt"
        torch.save(state, p)
        assert p.stat().st_size < 4096  # a small file: the bomb is in its shared references
        paths.append(p)
    return paths


@pytest.mark.parametrize("case", list(ENTRIES))
def test_an_entry_past_the_budget_is_left_out_and_the_weights_averaged(tmp_path, case):
    where, entry = ENTRIES[case]
    paths = _write(tmp_path, where, entry)
    out = tmp_path / "out.ckpt"
    proc = run_cli("average", *paths, "-o", out, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if "deep list" not in case:  # 90 deep fits the budget of depth (100): carried as it is
        named = "metadata entry 'a'" if where == "metadata" else f"entry {where!r}"
        assert named in proc.stderr, proc.stderr
        assert "left out" in proc.stderr, proc.stderr
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["state_dict"]["w"], torch.full((3,), 1.5))
    assert torch.equal(got["state_dict"]["n"], torch.tensor([8]))
    proc = run_cli("inspect", paths[0], timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_within_budget_counts_shared_references_each_time():
    from ckptavg.io.pickles import MAX_NODES, within_budget

    assert within_budget(_shared("tuple", 10)) is None  # 2**11 paths: fine
    assert "expands to more than" in within_budget(_shared("tuple", 40))
    assert "expands to more than" in within_budget(_shared("dict", 40))
    assert "nested more than" in within_budget(_deep(5000))
    cyclic: list = []
    cyclic.append(cyclic)
    assert "cycle" in within_budget(cyclic)
    assert within_budget(list(range(MAX_NODES - 1))) is None
    assert within_budget(list(range(MAX_NODES + 1))) is not None
