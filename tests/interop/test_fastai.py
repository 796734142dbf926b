"""fastai (issue #35), the library the SWA blog post added SWA to: the files a Learner writes
(`SaveModelCallback(every_epoch=True)`, `learn.save(with_opt=...)`) are averaged by the CLI,
and every output (average, bn-fix) loads back with fastai's own `learn.load` and
`load_model`, compared with a float64 mean and torch's `update_bn` computed here."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.interop.conftest import assert_matches, cli_ok, float64_mean

pytest.importorskip("fastai")

from fastai.callback.tracker import SaveModelCallback  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner, load_model  # noqa: E402

HERE = "tests.interop.test_fastai"


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2))


def data(split: str = "train") -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def _learner(folder) -> Learner:
    ds = data()
    dls = DataLoaders.from_dsets(list(zip(*ds.tensors)), list(zip(*ds.tensors)), bs=16,
                                 device="cpu")
    return Learner(dls, build(), loss_func=torch.nn.CrossEntropyLoss(), path=folder)


def _fit(folder, with_opt: bool) -> tuple[Learner, list[str]]:
    learn = _learner(folder)
    with learn.no_bar(), learn.no_logging():
        learn.fit(4, 0.05, cbs=SaveModelCallback(every_epoch=True, with_opt=with_opt))
    models = folder / "models"
    return learn, sorted(str(models / n) for n in os.listdir(models))


def _weights(path) -> dict:
    # fastai's optimizer state holds fastcore's L: the test's own files, trusted here
    obj = torch.load(path, weights_only=False)
    return obj["model"] if set(obj) == {"model", "opt"} else obj


@pytest.mark.parametrize("with_opt", [True, False], ids=["model+opt", "bare"])
def test_fastai_snapshots_average_into_a_file_learn_load_reads(tmp_path, with_opt):
    learn, files = _fit(tmp_path, with_opt)
    assert [os.path.basename(f) for f in files] == [f"model_{i}.pth" for i in range(4)]
    if with_opt:
        assert set(torch.load(files[0], weights_only=False)) == {"model", "opt"}
    plan = json.loads(cli_ok("average", *files, "--from-epoch", 1, "--dry-run", "--json"))
    assert [os.path.basename(p) for p in plan["inputs"]] == ["model_1.pth", "model_2.pth",
                                                             "model_3.pth"]  # epochs from names
    cli_ok("average", *files, "--from-epoch", 1, "-o", tmp_path / "models" / "swa.pth")
    want = float64_mean([_weights(f) for f in files[1:]])
    fresh = _learner(tmp_path)
    fresh.load("swa", with_opt=False)  # fastai's own loader, strict
    assert_matches(fresh.model.state_dict(), want)
    net = build()
    load_model(tmp_path / "models" / "swa.pth", net, None, with_opt=False)
    assert_matches(net.state_dict(), want)


def test_bn_fix_of_a_fastai_file_loads_with_learn_load_and_equals_update_bn(tmp_path):
    from torch.optim.swa_utils import update_bn

    _, files = _fit(tmp_path, with_opt=True)
    swa = tmp_path / "models" / "swa.pth"
    cli_ok("average", *files, "-o", swa)
    fixed = tmp_path / "models" / "fixed.pth"
    cli_ok("bn-fix", swa, "--model", f"{HERE}:build", "--data", f"{HERE}:data",
           "--batch-size", "64", "-o", fixed)
    ref = build()
    ref.load_state_dict(torch.load(swa, weights_only=True))  # a bare state dict
    update_bn(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data().tensors[0]),
                                          batch_size=64), ref)
    fresh = _learner(tmp_path)
    fresh.load("fixed", with_opt=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fresh.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # and in place: a bare file has nothing else to lose
    cli_ok("bn-fix", swa, "--model", f"{HERE}:build", "--data", f"{HERE}:data",
           "--batch-size", "64")
    again = _learner(tmp_path)
    again.load("swa", with_opt=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_a_bare_output_keeps_ckptavgs_metadata_for_into_and_reruns(tmp_path):
    """The bare .pth holds the metadata as an attribute that load_state_dict ignores:
    --into folds a new epoch into it, and a glob that catches it leaves it out."""
    _, files = _fit(tmp_path, with_opt=False)
    swa = tmp_path / "models" / "swa.pth"
    cli_ok("average", *files[:3], "-o", swa)
    cli_ok("average", files[3], "--into", swa)
    assert_matches(_weights(swa), float64_mean([_weights(f) for f in files]))
    assert torch.load(swa, weights_only=True).ckptavg_metadata["average.n"] == "4"
    glob = json.loads(cli_ok("average", str(tmp_path / "models" / "*.pth"), "--dry-run",
                             "--json"))
    assert len(glob["inputs"]) == 4 and not any("swa" in p for p in glob["inputs"])
