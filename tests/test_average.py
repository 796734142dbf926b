import collections
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.engine.plan import method_weights
from ckptavg.errors import CkptavgError, MismatchError, NonFiniteError, OptionError, OutputError
from ckptavg.options import Reading, Selection
from tests.conftest import (
    assert_state_equal,
    known_state,
    leftovers,
    reference_mean,
    write_safetensors,
)


def test_uniform_equals_float64_reference_exactly(tmp_path, ckpts):
    out = tmp_path / "swa.safetensors"
    res = ckptavg.average(ckpts, out)
    expected = reference_mean([known_state(i) for i in range(1, 5)])
    got, meta = ckptavg.load(out)
    assert_state_equal(got, expected)
    assert got["bn.num_batches_tracked"].item() == 40  # ints: the newest input's value
    assert got["bn.weight"][0].item() == 3.5  # (2+3+4+5)/4, exact
    assert res.n == 4 and res.method == "uniform"
    assert meta["average.n"] == "4"
    assert json.loads(meta["average.weights"]) == [0.25] * 4
    assert [e["file"] for e in json.loads(meta["average.inputs"])] == [
        os.path.basename(p) for p in ckpts]
    assert meta["bn.stale"] == "true"
    assert meta["model.arch"] == "tiny" and meta["data.name"] == "fashion-mnist"
    assert "train.epoch" not in meta


def test_matches_torch_swa_utils_averaged_model(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    swa = torch.optim.swa_utils.AveragedModel(net, use_buffers=True)
    paths = []
    for i in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(torch.randn(4))
        swa.update_parameters(net)
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        ckptavg.save(net.state_dict(), paths[-1], {"train.epoch": str(i + 1)})
    ckptavg.average(paths, tmp_path / "avg.safetensors")
    got, _ = ckptavg.load(tmp_path / "avg.safetensors")
    ref = swa.module.state_dict()
    for k, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_ema_matches_torch_averaged_model(tmp_path):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    decay = 0.9
    net = torch.nn.Linear(6, 3)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay))
    paths = []
    for i in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        ema.update_parameters(net)
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        ckptavg.save(net.state_dict(), paths[-1])
    res = ckptavg.average(paths, tmp_path / "ema.safetensors", ema=decay)
    got, meta = ckptavg.load(tmp_path / "ema.safetensors")
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    assert res.method == "ema" and meta["average.method"] == "ema"
    # The first input seeds the average (weight decay^(n-1)); later ones grow towards the newest.
    assert abs(sum(res.weights) - 1) < 1e-12 and res.weights[0] == pytest.approx(decay**5)
    assert res.weights[1:] == sorted(res.weights[1:])


def test_weighted(tmp_path, ckpts):
    ckptavg.average(ckpts, tmp_path / "w.safetensors", weights=[1, 2, 3, 2])
    got, meta = ckptavg.load(tmp_path / "w.safetensors")
    expected = reference_mean([known_state(i) for i in range(1, 5)], [1, 2, 3, 2])
    assert_state_equal(got, expected)
    assert json.loads(meta["average.weights"]) == [0.125, 0.25, 0.375, 0.25]


def test_method_weights_errors():
    with pytest.raises(CkptavgError, match="weights: 3 given for 2 selected inputs"):
        method_weights(2, "weighted", [1, 2, 3])
    with pytest.raises(CkptavgError, match="non-negative"):
        method_weights(2, "weighted", [1, -1])
    with pytest.raises(CkptavgError, match=r"\[0, 1\)"):
        method_weights(2, "ema", decay=1.5)
    assert method_weights(3, "ema", decay=0.0) == [0.0, 0.0, 1.0]


def test_into_equals_one_shot(tmp_path):
    paths = write_safetensors(tmp_path, 8)
    running = tmp_path / "swa.safetensors"
    ckptavg.average(paths[:2], running)
    ckptavg.average(paths[2:4], into=running)  # n: 2 -> 4 -> 8, so every mean is exact
    res = ckptavg.average(paths[4:], into=running)
    ckptavg.average(paths, tmp_path / "once.safetensors")
    a, ma = ckptavg.load(running)
    b, mb = ckptavg.load(tmp_path / "once.safetensors")
    assert_state_equal(a, b)  # known values: exact in float32
    assert res.n == 8 and ma["average.n"] == "8"
    assert json.loads(ma["average.inputs"]) == json.loads(mb["average.inputs"])


def test_into_missing_file(tmp_path, ckpts):
    with pytest.raises(CkptavgError, match="nope.safetensors: no such file; folding into a running average needs"):
        ckptavg.average(ckpts, into=tmp_path / "nope.safetensors")


def test_into_needs_average_metadata(tmp_path, ckpts):
    with pytest.raises(CkptavgError, match="no average.n metadata"):
        ckptavg.average(ckpts[1:], into=ckpts[0], output=tmp_path / "o.safetensors")


def test_dtype_conversion_and_float32_accumulation(tmp_path, ckpts):
    ckptavg.average(ckpts, tmp_path / "b.safetensors", dtype="bfloat16", accumulate="float32")
    got, _ = ckptavg.load(tmp_path / "b.safetensors")
    assert got["conv.weight"].dtype == torch.bfloat16
    assert got["bn.num_batches_tracked"].dtype == torch.int64
    expected = reference_mean([known_state(i) for i in range(1, 5)])
    assert torch.equal(got["bn.weight"], expected["bn.weight"].bfloat16())


def test_mismatch_lists_missing_extra_and_shapes(tmp_path, ckpts):
    bad = known_state(9)
    bad.pop("fc.bias")
    bad["extra.w"] = torch.ones(1)
    bad["conv.weight"] = torch.ones(4, 2, 5, 5)
    p = str(tmp_path / "bad.safetensors")
    save_file(bad, p, metadata={"train.epoch": "9"})
    out = tmp_path / "o.safetensors"
    with pytest.raises(MismatchError) as e:
        ckptavg.average(ckpts + [p], out)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "missing 1 key(s) (fc.bias)" in msg
    assert "extra 1 key(s) (extra.w)" in msg
    assert "conv.weight [4, 2, 5, 5] vs [4, 2, 3, 3]" in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_nonfinite_stops_and_leaves_nothing(tmp_path, ckpts):
    bad = known_state(5)
    bad["fc.bias"][1] = float("nan")  # the last key written: output was partly streamed
    p = str(tmp_path / "epoch-0005.safetensors")
    save_file(bad, p, metadata={"train.epoch": "5"})
    out = tmp_path / "o.safetensors"
    with pytest.raises(NonFiniteError, match=r"epoch-0005.safetensors: tensor 'fc.bias' holds 1 NaN"):
        ckptavg.average(ckpts + [p], out)
    assert not out.exists() and leftovers(tmp_path) == []
    ckptavg.average(ckpts + [p], out, allow_nonfinite=True)
    assert torch.isnan(load_file(str(out))["fc.bias"][1])


def test_refuses_to_overwrite_an_input(tmp_path, ckpts):
    before = open(ckpts[0], "rb").read()
    with pytest.raises(OutputError, match="is one of the inputs"):
        ckptavg.average(ckpts, ckpts[0])
    assert open(ckpts[0], "rb").read() == before


def test_selection_window_last_every(tmp_path):
    paths = write_safetensors(tmp_path, 12)
    r = ckptavg.average(paths, dry_run=True, selection=Selection(from_epoch=5, to_epoch=11))
    assert r.epochs == [5, 6, 7, 8, 9, 10, 11]
    r = ckptavg.average(paths, dry_run=True, selection=Selection(from_epoch=5, every=2, last=3))
    assert r.epochs == [7, 9, 11]
    with pytest.raises(OptionError, match="inputs' epochs run from 1 to 12"):
        ckptavg.average(paths, dry_run=True, selection=Selection(from_epoch=50))


def test_natural_order_by_name_without_metadata(tmp_path):
    for i in (1, 2, 9, 10):
        save_file({"w": torch.full((1,), float(i)), "n": torch.tensor(i)},
                  str(tmp_path / f"ck-{i}.safetensors"))
    names = [str(tmp_path / f"ck-{i}.safetensors") for i in (10, 9, 2, 1)]
    r = ckptavg.average(names, tmp_path / "o.safetensors")
    assert [os.path.basename(p) for p in r.inputs] == [f"ck-{i}.safetensors" for i in (1, 2, 9, 10)]
    assert ckptavg.load(tmp_path / "o.safetensors")[0]["n"].item() == 10


def test_cycle_ends(tmp_path):
    paths = []
    for i in range(1, 7):
        p = str(tmp_path / f"e{i}.safetensors")
        save_file({"w": torch.full((1,), float(i))}, p,
                  metadata={"train.epoch": str(i), "train.cycle_end": str(i % 2 == 0).lower()})
        paths.append(p)
    r = ckptavg.average(paths, tmp_path / "c.safetensors", selection=Selection(cycle_ends=True))
    assert r.epochs == [2, 4, 6]
    assert ckptavg.load(tmp_path / "c.safetensors")[0]["w"].item() == 4.0


def test_glob_patterns_and_duplicates(tmp_path, ckpts):
    r = ckptavg.average([str(tmp_path / "epoch-*.safetensors")], dry_run=True)
    assert len(r.inputs) == 4
    with pytest.raises(CkptavgError, match="given twice"):
        ckptavg.average([ckpts[0], ckpts[0]], dry_run=True)
    with pytest.raises(CkptavgError, match="matches no file"):
        ckptavg.average([str(tmp_path / "nope-*.pt")], dry_run=True)


@pytest.mark.parametrize("suffix", [".pt", "-folder"])
def test_output_formats_roundtrip(tmp_path, ckpts, suffix):
    out = tmp_path / f"swa{suffix}"
    ckptavg.average(ckpts, out, shard_size=300 if suffix == "-folder" else None)
    got, meta = ckptavg.load(out)
    assert_state_equal(got, reference_mean([known_state(i) for i in range(1, 5)]))
    assert meta["average.n"] == "4"
    if suffix == ".pt":  # safetensors files are bare state dicts: so is the .pt
        raw = torch.load(out, weights_only=True)
        assert type(raw) is collections.OrderedDict and set(raw) == set(got)
        assert raw.ckptavg_metadata["average.n"] == "4"  # torch's unpickler sets it


def test_pt_inputs_with_ties_and_optimizer_state(tmp_path):
    paths = []
    for i in range(3):
        w = torch.full((2, 2), float(i))
        obj = {"model": {"module.emb.weight": w, "module.head.weight": w,
                         "module.n": torch.tensor(i)},
               "optimizer": {"state": {}, "param_groups": []}, "epoch": i}
        paths.append(str(tmp_path / f"ck-{i}.pt"))
        torch.save(obj, paths[-1])
    out = tmp_path / "avg.pt"
    ckptavg.average(paths, out)
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"model", "metadata"}  # the inputs' entry; no optimizer, no epoch
    raw = obj["model"]
    assert set(raw) == {"emb.weight", "head.weight", "n"}
    assert raw["emb.weight"].data_ptr() == raw["head.weight"].data_ptr()  # still tied
    assert torch.equal(raw["emb.weight"], torch.ones(2, 2))


def test_hash_records_sha256(tmp_path, ckpts):
    import hashlib

    ckptavg.average(ckpts[:2], tmp_path / "h.safetensors", hash_inputs=True)
    entries = json.loads(ckptavg.load(tmp_path / "h.safetensors")[1]["average.inputs"])
    assert entries[0]["sha256"] == hashlib.sha256(open(ckpts[0], "rb").read()).hexdigest()


def test_metadata_not_carried_when_inputs_disagree(tmp_path):
    a = write_safetensors(tmp_path, 1, start=1)
    b = write_safetensors(tmp_path, 1, start=2, meta_extra={"model.arch": "other"})
    ckptavg.average(a + b, tmp_path / "o.safetensors")
    meta = ckptavg.load(tmp_path / "o.safetensors")[1]
    assert "model.arch" not in meta and meta["data.name"] == "fashion-mnist"


def test_save_load_api_roundtrip(tmp_path):
    w = torch.randn(3, 3)
    state = {"a": w, "b": w, "c": torch.arange(3)}
    for name in ("x.safetensors", "x.pt"):
        ckptavg.save(state, tmp_path / name, {"k": "v"})
        got, meta = ckptavg.load(tmp_path / name)
        assert meta == {"k": "v"}
        assert torch.equal(got["a"], w) and torch.equal(got["b"], w)


# Property tests: small random float tensors, several inputs.
_arrays = st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=3, max_size=3),
                   min_size=1, max_size=6)


def _write(folder, rows, prefix):
    """One file per row; each records its epoch, so equal rows are still distinct
    checkpoints (a byte-identical copy is refused: see test_a_copy_of_an_input_is_refused)."""
    paths = []
    for i, row in enumerate(rows):
        p = os.path.join(folder, f"{prefix}-{i:03d}.safetensors")
        save_file({"w": torch.tensor(row, dtype=torch.float32)}, p, {"train.epoch": str(i)})
        paths.append(p)
    return paths


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_arrays, seed=st.integers(0, 1000))
def test_property_uniform_mean_is_order_invariant(tmp_path_factory, rows, seed):
    d = str(tmp_path_factory.mktemp("p"))
    paths = _write(d, rows, "a")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = _write(d, [rows[i] for i in perm], "b")
    ckptavg.average(paths, os.path.join(d, "x.safetensors"))
    ckptavg.average(shuffled, os.path.join(d, "y.safetensors"))
    x = load_file(os.path.join(d, "x.safetensors"))["w"]
    y = load_file(os.path.join(d, "y.safetensors"))["w"]
    torch.testing.assert_close(x, y, rtol=0, atol=0)  # float64 sums of float32: order-exact
    ref = torch.tensor(rows, dtype=torch.float32).double().mean(0).float()
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=5),
       n=st.integers(1, 7))
def test_property_identical_inputs_are_identity(tmp_path_factory, row, n):
    d = str(tmp_path_factory.mktemp("p"))
    paths = _write(d, [row] * n, "a")
    ckptavg.average(paths, os.path.join(d, "x.safetensors"))
    assert torch.equal(load_file(os.path.join(d, "x.safetensors"))["w"],
                       torch.tensor(row, dtype=torch.float32))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2,
                              max_size=2), min_size=2, max_size=6), split=st.integers(1, 5))
def test_property_into_equals_one_shot(tmp_path_factory, rows, split):
    split = min(split, len(rows) - 1)
    d = str(tmp_path_factory.mktemp("p"))
    paths = _write(d, rows, "a")
    run = os.path.join(d, "run.safetensors")
    ckptavg.average(paths[:split], run)
    ckptavg.average(paths[split:], into=run)
    ckptavg.average(paths, os.path.join(d, "once.safetensors"))
    a = load_file(run)["w"]
    b = load_file(os.path.join(d, "once.safetensors"))["w"]
    # The running file is stored in float32, so folding rounds once per step: a few ulps.
    torch.testing.assert_close(a, b, rtol=4e-7 * len(rows), atol=1e-5)


def test_float64_tensors_to_pt_output_are_not_aliased_to_scratch(tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"d{i}.safetensors"))
        save_file({"a": torch.full((3,), float(i), dtype=torch.float64),
                   "b": torch.full((2,), 10.0 + i, dtype=torch.float64)}, paths[-1])
    ckptavg.average(paths, tmp_path / "o.pt")
    got, _ = ckptavg.load(tmp_path / "o.pt")
    assert torch.equal(got["a"], torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(got["b"], torch.full((2,), 10.5, dtype=torch.float64))


def test_into_reports_the_weights_it_applied(tmp_path, ckpts):
    """Folding 2 new inputs into an average of 2 applies [2/4, 1/4, 1/4], and says so
    (not [0.5, 0.5]); the means of 2 are exact in binary, so the result is too."""
    run = tmp_path / "run.safetensors"
    ckptavg.average(ckpts[:2], run)
    r = ckptavg.average(ckpts[2:], into=run)
    assert r.inputs == [str(run), *ckpts[2:]] and r.weights == [0.5, 0.25, 0.25] and r.n == 4
    got, meta = ckptavg.load(run)
    assert_state_equal(got, reference_mean([known_state(i) for i in range(1, 5)]))
    assert json.loads(meta["average.weights"]) == [0.25] * 4


def test_input_options_do_not_apply_to_the_running_average(tmp_path, ckpts):
    run = tmp_path / "run.safetensors"
    ckptavg.average(ckpts[:1], run)
    new = tmp_path / "new.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in known_state(2).items()}}, new)
    ckptavg.average([new], into=run, reading=Reading(strip_prefix="model."))
    got, _ = ckptavg.load(run)
    assert_state_equal(got, reference_mean([known_state(1), known_state(2)]))


def test_pt_key_order_is_kept(tmp_path):
    """A torch state dict has an order (load_state_dict error messages, printing): the
    average keeps the first input's, read back with torch.load itself."""
    keys = ["z.weight", "a.bias", "m.running_mean", "b.weight"]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"e{i}.pt")
        torch.save({k: torch.full((3,), float(i + j)) for j, k in enumerate(keys)}, paths[-1])
    out = tmp_path / "avg.pt"
    ckptavg.average(paths, out)
    got = torch.load(out, weights_only=True)
    assert list(got) == keys
    assert torch.equal(got["a.bias"], torch.full((3,), 1.5))


def test_a_copy_of_an_input_is_refused(tmp_path):
    """timm's last.pth.tar / model_best.pth.tar are copies where hard links fail."""
    import shutil

    a = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"state_dict": {"w": torch.randn(100_000)}, "epoch": 3}, a)
    b = tmp_path / "checkpoint-4.pth.tar"
    torch.save({"state_dict": {"w": torch.randn(100_000)}, "epoch": 4}, b)
    shutil.copyfile(a, tmp_path / "model_best.pth.tar")
    with pytest.raises(CkptavgError, match="model_best.pth.tar: holds the same bytes as .*checkpoint-3"):
        ckptavg.average(sorted(map(str, tmp_path.glob("*.pth.tar"))), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_files_equal_in_the_sampled_blocks_are_not_taken_for_copies(tmp_path):
    """The fingerprint samples four blocks; files differing elsewhere are distinct."""
    base = torch.zeros(1_000_000)
    other = base.clone()
    other[100_000] = 1.0  # outside the sampled blocks (start, thirds, end)
    save_file({"w": base}, tmp_path / "a.safetensors")
    save_file({"w": other}, tmp_path / "b.safetensors")
    r = ckptavg.average([tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                        tmp_path / "o.safetensors")
    assert r.n == 2 and load_file(tmp_path / "o.safetensors")["w"][100_000] == 0.5


def test_into_skips_inputs_already_folded(tmp_path, ckpts):
    """The cron pattern: fold a glob into the average again and again; each checkpoint
    counts once."""
    run = tmp_path / "cron.safetensors"
    ckptavg.average(ckpts[:2], run)
    r = ckptavg.average(ckpts, into=run)
    assert r.n == 4 and r.skipped == [str(p) for p in ckpts[:2]]
    assert any("already folded" in w for w in r.warnings)
    ref = {k: torch.stack([known_state(i)[k].double() for i in range(1, 5)]).mean(0)
           for k in known_state(1) if known_state(1)[k].is_floating_point()}
    got = load_file(run)
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
    before = run.read_bytes()
    r = ckptavg.average(ckpts, into=run)
    assert r.n == 4 and r.inputs == [] and run.read_bytes() == before


def test_inputs_of_different_runs_are_reported(tmp_path):
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"epoch-000{seed + 1}.safetensors")
        save_file({"w": torch.full((3,), float(seed))}, paths[-1],
                  {"train.seed": str(seed), "train.epoch": str(seed + 1)})
    r = ckptavg.average(paths, tmp_path / "o.safetensors")
    assert any("different runs: train.seed is 0 / 1" in w for w in r.warnings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("block", [None, "odd"])
def test_chunked_reduction_is_the_float64_mean_rounded_once(tmp_path, monkeypatch, dtype,
                                                            suffix, block):
    """Tensors longer than the engine's chunk, of a length that is no multiple of it, read
    from both formats in one read-ahead block or in several blocks of an odd size: the
    output is the float64 mean rounded once to the output dtype. (Weighted means are checked
    with a tolerance elsewhere: normalised weights round differently from the test's sum.)"""
    import ckptavg.engine.kernel as engine

    if block:
        monkeypatch.setattr(engine, "BLOCK", engine.CHUNK // 2 + 7)
    n = 2 * engine.CHUNK + 13
    tensors, paths = [], []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        tensors.append((torch.randn(n, generator=g) * 3).to(dtype))
        paths.append(tmp_path / f"e{i}{suffix}")
        state = {"w": tensors[-1], "b": tensors[-1][:5].clone()}
        if suffix == ".pt":
            torch.save({"state_dict": state, "epoch": i + 1}, paths[-1])
        else:
            save_file(state, paths[-1], {"train.epoch": str(i + 1)})
    with ckptavg.open_checkpoint(paths[0]) as r:
        assert r.locate("w") is not None  # read with pread, not through the map
    ckptavg.average(paths, tmp_path / "o.safetensors")
    got = load_file(tmp_path / "o.safetensors")["w"]
    want = (sum(t.double() for t in tensors) / len(tensors)).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_an_average_that_overflows_the_output_dtype_is_an_error(tmp_path):
    paths = []
    for i, v in enumerate((7e4, 8e4)):  # the mean, 7.5e4, is past float16's 65504
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({"w": torch.full((10,), v)}, paths[-1], {"train.epoch": str(i)})
    with pytest.raises(NonFiniteError, match="overflows .*output dtype float16"):
        ckptavg.average(paths, tmp_path / "o.safetensors", dtype="float16")
    assert not (tmp_path / "o.safetensors").exists()


def test_the_thread_count_is_restored(tmp_path, ckpts):
    before = torch.get_num_threads()
    ckptavg.average(ckpts, tmp_path / "o.safetensors", threads=1)
    assert torch.get_num_threads() == before


def test_more_inputs_than_a_group_are_summed_group_by_group(tmp_path, monkeypatch):
    """Past GROUP inputs the engine sums groups into a tensor-sized accumulator (memory flat
    in N); the result is still the float64 weighted mean rounded once."""
    import ckptavg.engine.kernel as engine

    monkeypatch.setattr(engine, "GROUP", 2)
    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "BLOCK", 1500)  # read ahead in blocks of a chunk and a half
    tensors, paths = [], []
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        tensors.append(torch.randn(2503, generator=g))
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file({"w": tensors[-1]}, paths[-1], {"train.epoch": str(i)})
    ckptavg.average(paths, tmp_path / "o.safetensors")
    want = (sum(t.double() for t in tensors) / len(tensors)).float()
    assert torch.equal(load_file(tmp_path / "o.safetensors")["w"], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", ["o.safetensors", "folder"])
def test_tensors_larger_than_a_slice_are_written_in_slices(tmp_path, monkeypatch, dtype, out):
    """A tensor larger than SLICE output bytes is reduced and written slice by slice (output
    buffers of one slice, not of the largest tensor), with more inputs than a group: every
    value is still the float64 mean rounded once, and the shapes and neighbours are intact."""
    import ckptavg.engine.kernel as engine

    monkeypatch.setattr(engine, "GROUP", 3)
    monkeypatch.setattr(engine, "CHUNK", 1000)
    monkeypatch.setattr(engine, "BLOCK", 3000)
    monkeypatch.setattr(engine, "SLICE", 4000 * dtype.itemsize)  # 4 chunks per slice
    tensors, paths = [], []
    for i in range(7):
        g = torch.Generator().manual_seed(i)
        tensors.append({"big": (torch.randn(101, 173, generator=g) * 2).to(dtype),  # 17473
                        "small": torch.randn(7, generator=g).to(dtype),
                        "steps": torch.tensor([i])})
        paths.append(tmp_path / f"e{i}.safetensors")
        save_file(tensors[-1], paths[-1], {"train.epoch": str(i)})
    ckptavg.average(paths, tmp_path / out, shard_size=100_000 if out == "folder" else None)
    got, _ = ckptavg.load(tmp_path / out)
    for k in ("big", "small"):
        want = (sum(t[k].double() for t in tensors) / len(tensors)).to(dtype)
        assert got[k].shape == want.shape and torch.equal(got[k], want), k
    assert torch.equal(got["steps"], torch.tensor([6]))
