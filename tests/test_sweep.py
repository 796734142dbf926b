"""`average --sweep`: one average per window position, every input read once.

Each window's output is compared bit for bit with `average` of that window alone, and with
a float64 mean (or profile-weighted mean) computed here from the inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.cli import cli
from ckptavg.engine import sweep as sweeps
from ckptavg.errors import OptionError


def _states(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append({
            "layer.weight": torch.randn(37, 53, generator=g).to(dtype),
            "layer.bias": torch.randn(53, generator=g).to(dtype),
            "half": torch.randn(300, generator=g).to(torch.float16),
            "bn.num_batches_tracked": torch.tensor(100 * i),
        })
    return out


def _write(folder, states, fmt="safetensors", meta=None):
    paths = []
    for i, s in enumerate(states):
        p = os.path.join(folder, f"epoch-{i:03d}.{fmt}")
        m = {"train.epoch": str(i), **({k: v(i) for k, v in (meta or {}).items()})}
        if fmt == "safetensors":
            save_file(s, p, metadata=m)
        else:
            torch.save({"state_dict": s, "epoch": i}, p)
        paths.append(p)
    return paths


def _tensors(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    obj = torch.load(path, weights_only=True)
    return obj["state_dict"] if "state_dict" in obj else obj


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8) if a[k].numel() else a[k],
                           b[k].view(-1).view(torch.uint8) if b[k].numel() else b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,stride", [(4, 1), (3, 2), (12, 1), (1, 1)])
def test_each_window_is_bitwise_its_own_average(tmp_path, dtype, window, stride):
    states = _states(12, dtype)
    paths = _write(tmp_path, states)
    out = tmp_path / "sweep"
    r = ckptavg.average(paths, out, sweep=f"window={window},stride={stride}")
    ends = list(range(11, window - 2, -stride))[::-1]
    assert [w.inputs for w in r.windows] == [paths[e - window + 1:e + 1] for e in ends]
    assert len(os.listdir(out)) == len(ends)
    for j, (w, e) in enumerate(zip(r.windows, ends)):
        part = paths[e - window + 1:e + 1]
        alone = ckptavg.average(part, tmp_path / f"alone-{j}.safetensors")
        got = _tensors(w.output)
        _same_bits(got, _tensors(alone.output))
        # an independent reference: the float64 mean of the window, rounded once
        for k in ("layer.weight", "layer.bias", "half"):
            ref = torch.stack([states[i][k].double() for i in range(e - window + 1, e + 1)]).mean(0)
            assert torch.equal(got[k], ref.to(got[k].dtype)), k
        assert got["bn.num_batches_tracked"].item() == 100 * e  # the newest input's
        with safe_open(w.output, "np") as f:
            meta = f.metadata()
        bounds = json.loads(meta["average.window"])
        assert bounds["index"] == j and bounds["of"] == len(ends)
        assert bounds["first"] == f"epoch{e - window + 1}" and bounds["last"] == f"epoch{e}"
        entries = json.loads(meta["average.inputs"])
        assert [x["file"] for x in entries] == [os.path.basename(p) for p in part]
        assert all(x["content"].startswith("xxh3-128:") and "~" not in x["content"]
                   for x in entries)
        assert meta["average.n"] == str(window)


def test_more_inputs_in_a_window_than_read_at_once(tmp_path):
    """34 inputs per window: the single run sums them group by group (GROUP = 32)."""
    states = _states(36, torch.float32, seed=3)
    paths = _write(tmp_path, states)
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=34")
    assert len(r.windows) == 3
    for w in r.windows:
        alone = ckptavg.average(w.inputs, tmp_path / "alone.safetensors")
        _same_bits(_tensors(w.output), _tensors(alone.output))


@pytest.mark.parametrize("profile", ["ema:halflife=2", "wsm:linear", None])
def test_profiles_and_ema_weight_each_window_as_alone(tmp_path, profile):
    states = _states(9, torch.float32, seed=5)
    paths = _write(tmp_path, states)
    kw = {"profile": profile} if profile else {"ema": 0.5}
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=5,stride=2", **kw)
    assert len(r.windows) == 3
    for w in r.windows:
        alone = ckptavg.average(w.inputs, tmp_path / "alone.safetensors", **kw)
        assert w.weights == alone.weights
        _same_bits(_tensors(w.output), _tensors(alone.output))
        first = int(os.path.basename(w.inputs[0])[6:9])
        ref = sum(wt * states[first + i]["layer.weight"].double()
                  for i, wt in enumerate(w.weights))
        torch.testing.assert_close(_tensors(w.output)["layer.weight"].double(), ref,
                                   rtol=1e-6, atol=1e-6)


def test_torch_inputs_give_torch_outputs_as_laid_out(tmp_path):
    states = _states(6, torch.float32, seed=7)
    paths = _write(tmp_path, states, fmt="pt")
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=3,stride=3")
    assert [os.path.basename(w.output) for w in r.windows] == [
        "window-epoch0-epoch2.pt", "window-epoch3-epoch5.pt"]
    for w in r.windows:
        obj = torch.load(w.output, weights_only=True)
        assert set(obj) >= {"state_dict"}
        alone = ckptavg.average(w.inputs, tmp_path / "alone.pt")
        _same_bits(obj["state_dict"], _tensors(alone.output))


def test_template_output_and_safetensors_from_torch(tmp_path):
    paths = _write(tmp_path, _states(5, seed=2), fmt="pt")
    r = ckptavg.average(paths, str(tmp_path / "w{index}-{last}.safetensors"), sweep="window=2")
    assert [os.path.basename(w.output) for w in r.windows] == [
        f"w{j}-epoch{j + 1}.safetensors" for j in range(4)]
    with pytest.raises(OptionError, match="same file"):
        ckptavg.average(paths, str(tmp_path / "w{{x}}.safetensors"), sweep="window=2")
    with pytest.raises(OptionError, match="several outputs"):
        ckptavg.average(paths, str(tmp_path / "one.safetensors"), sweep="window=2")


def _sharded(folder, state):
    """A Hugging Face sharded folder, written by hand: two shards and their index."""
    os.makedirs(folder)
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[:2],
              "model-00002-of-00002.safetensors": keys[2:]}
    weight_map = {}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, os.path.join(folder, name))
        weight_map.update({k: name for k in ks})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_sharded_folder_inputs_give_folders(tmp_path):
    folders = []
    for i, s in enumerate(_states(4, seed=9)):
        d = str(tmp_path / f"checkpoint-{(i + 1) * 100}")
        _sharded(d, s)
        folders.append(d)
    r = ckptavg.average(folders, tmp_path / "s", sweep="window=2")
    assert [os.path.basename(w.output) for w in r.windows] == [
        "window-step100-step200", "window-step200-step300", "window-step300-step400"]
    for w in r.windows:
        assert os.path.exists(os.path.join(w.output, "model.safetensors.index.json"))
        alone = ckptavg.average(w.inputs, tmp_path / "alone")
        with ckptavg.io.open_checkpoint(w.output) as a, \
                ckptavg.io.open_checkpoint(alone.output) as b:
            assert a.keys() == b.keys()
            for k in a.keys():
                assert torch.equal(a.read(k), b.read(k)), k


def test_every_input_is_read_once(tmp_path, monkeypatch):
    states = _states(12, seed=11)
    paths = _write(tmp_path, states)
    read = []
    real = sweeps.pread_extent

    def counting(ext, view, start=0):
        read.append(len(view))
        real(ext, view, start)

    monkeypatch.setattr(sweeps, "pread_extent", counting)
    ckptavg.average(paths, tmp_path / "s", sweep="window=4")
    floats = sum(t.numel() * t.element_size() for t in states[0].values() if t.is_floating_point())
    assert sum(read) == 12 * floats


def test_token_windows(tmp_path):
    states = _states(10, seed=13)
    # saved every 25B tokens, the batch ramping: steps are not tokens
    tokens = [25 * 10**9 * (i + 1) for i in range(10)]
    paths = _write(tmp_path, states, meta={"train.tokens": lambda i: str(tokens[i]),
                                            "train.step": lambda i: str(i * i * 10)})
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=100B,stride=50B")
    # (t - 100B, t] holds 4 inputs; the ends step back 50B from the newest
    assert [(w.inputs[0], w.inputs[-1]) for w in r.windows] == [
        (paths[0], paths[3]), (paths[2], paths[5]), (paths[4], paths[7]), (paths[6], paths[9])]
    assert r.order == "tokens" and r.windows[0].tokens == tokens[0:4]
    assert os.path.basename(r.windows[0].output) == f"window-{tokens[0]}-{tokens[3]}.safetensors"
    # a token window that does not fit
    with pytest.raises(OptionError, match="no window"):
        ckptavg.average(paths, tmp_path / "t", sweep="window=300B")


def test_token_window_needs_tokens(tmp_path):
    paths = _write(tmp_path, _states(4))
    with pytest.raises(OptionError, match="records none"):
        ckptavg.average(paths, tmp_path / "s", sweep="window=2B")


def test_parse():
    assert sweeps.parse("window=4").stride == 1
    s = sweeps.parse(" window=125B , stride=25B ")
    assert (s.window, s.stride, s.unit) == (125 * 10**9, 25 * 10**9, "tokens")
    for bad in ("window=0", "stride=2", "window=4,window=5", "window=x", "win=4", "window=1.5"):
        with pytest.raises(OptionError):
            sweeps.parse(bad)


def test_failure_leaves_nothing(tmp_path):
    states = _states(6, seed=17)
    states[4]["layer.bias"][3] = float("nan")
    paths = _write(tmp_path, states)
    with pytest.raises(ckptavg.CkptavgError, match="NaN|non-finite|nonfinite"):
        ckptavg.average(paths, tmp_path / "s", sweep="window=2")
    assert not os.path.exists(tmp_path / "s")
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


def test_cli_json_and_errors(tmp_path):
    paths = _write(tmp_path, _states(5, seed=19))
    runner = CliRunner()
    res = runner.invoke(cli, ["average", *paths, "--sweep", "window=2", "-o",
                              str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["sweep"] == "window=2" and len(data["windows"]) == 4
    assert all(os.path.exists(w["output"]) for w in data["windows"])
    for args in (["--sweep", "window=9"], ["--sweep", "window=2", "--into", paths[0]],
                 ["--sweep", "window=2", "--weights", "1,2,3,4,5"], ["--sweep", "wind=2"]):
        res = runner.invoke(cli, ["average", *paths, "-o", str(tmp_path / "t"), *args])
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / "t")
    # outputs beside the inputs, twice: the second run's glob catches the first's outputs,
    # leaves them out (they are ours) and replaces them
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "ckptavg", "average",
                              str(tmp_path / "*.safetensors"), "--sweep", "window=2", "-o",
                              str(tmp_path), "-q"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert len([f for f in os.listdir(tmp_path) if f.startswith("window-")]) == 4
    _same_bits(load_file(tmp_path / "window-epoch3-epoch4.safetensors"),
               load_file(tmp_path / "s" / "window-epoch3-epoch4.safetensors"))


def test_output_over_a_file_of_the_user_is_refused(tmp_path):
    paths = _write(tmp_path, _states(3, seed=23))
    os.makedirs(tmp_path / "s")
    mine = tmp_path / "s" / "window-epoch1-epoch2.safetensors"
    mine.write_bytes(b"mine")
    with pytest.raises(ckptavg.CkptavgError, match="not an output of ckptavg"):
        ckptavg.average(paths, tmp_path / "s", sweep="window=2")
    assert mine.read_bytes() == b"mine" and os.listdir(tmp_path / "s") == [mine.name]


def test_tokens_from_trainer_state_and_dry_run(tmp_path):
    states = _states(4, seed=29)
    folders = []
    for i, s in enumerate(states):
        d = tmp_path / f"checkpoint-{(i + 1) * 10}"
        os.makedirs(d)
        save_file(s, d / "model.safetensors")
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": (i + 1) * 10, "epoch": 1.5, "num_input_tokens_seen": 4096 * (i + 1) ** 2}))
        folders.append(str(d))
    r = ckptavg.average(folders, dry_run=True, sweep="window=2")
    assert r.order == "tokens"
    assert r.tokens == [4096 * (i + 1) ** 2 for i in range(4)]
    assert r.token_sources == ["trainer_state.json num_input_tokens_seen"] * 4
    res = CliRunner().invoke(cli, ["average", *folders, "--dry-run", "--to-tokens", "20k"])
    assert res.exit_code == 0, res.output
    assert "tokens seen" in res.output and "tokens 16.4k" in res.output
    assert "checkpoint-30" not in res.output  # 36864 > 20k


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, {"accumulate": "float32"},
                                {"dtype": "float16", "accumulate": "float32"}])
def test_precision_options_apply_to_every_window_bitwise(tmp_path, kw):
    paths = _write(tmp_path, _states(7, seed=31))
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=3,stride=2", **kw)
    assert len(r.windows) == 3
    for w in r.windows:
        alone = ckptavg.average(w.inputs, tmp_path / "alone.safetensors", **kw)
        _same_bits(_tensors(w.output), _tensors(alone.output))
        assert ckptavg.verify(w.output).status == "verified"


def test_tied_tensors_stay_tied_in_torch_windows(tmp_path):
    paths = []
    g = torch.Generator().manual_seed(37)
    for i in range(4):
        emb = torch.randn(11, 6, generator=g)
        p = tmp_path / f"epoch-{i}.pt"
        torch.save({"emb.weight": emb, "head.weight": emb, "b": torch.randn(6, generator=g)}, p)
        paths.append(str(p))
    r = ckptavg.average(paths, tmp_path / "s", sweep="window=2")
    for w in r.windows:
        got = torch.load(w.output, weights_only=True)
        assert got["emb.weight"].data_ptr() == got["head.weight"].data_ptr()
        alone = ckptavg.average(w.inputs, tmp_path / "alone.pt")
        want = torch.load(alone.output, weights_only=True)
        assert all(torch.equal(got[k], want[k]) for k in want)
