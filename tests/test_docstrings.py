"""The public API's docstrings: each function has Args, Returns and an Example, and every
Example runs as written (doctest) in a folder holding a small run of convnet_bn on the
Fashion-MNIST subset shipped with the package ($CKPTAVG_DATA points at it). An example
that trains for minutes says so and is marked +SKIP."""

from __future__ import annotations

import doctest
import inspect
import os

import pytest
import torch

import ckptavg
from ckptavg.experiments.demo import demo_data_dir

# In this order: later examples read what earlier ones wrote (swa.safetensors, swag.safetensors).
ORDER = ["load", "save", "inspect", "open_checkpoint", "method_weights", "average", "verify",
         "bn_fix",
         "evaluate", "ensemble", "recalibrate", "soup", "search", "search_profiles", "swag",
         "evaluate_swag", "width", "create_model", "list_models", "register_model",
         "replicate", "run_demo"]


def _functions():
    return [n for n in ckptavg.__all__ if not n.startswith("__")
            and inspect.isfunction(getattr(ckptavg, n))]


def test_every_public_function_is_in_the_run_order():
    assert sorted(ORDER) == sorted(_functions())


@pytest.mark.parametrize("name", sorted(set(ORDER)))
def test_docstring_has_args_returns_and_an_example(name):
    doc = inspect.getdoc(getattr(ckptavg, name))
    for part in ("Args:", "Returns:", "Example:"):
        assert part in doc, (name, part)
    assert ">>>" in doc.split("Example:")[1]


def _documented(doc: str) -> set[str]:
    """The parameter names an Args block lists: `name:` or `a, b:` entries at its indent
    (`**kwargs` spelled with its stars)."""
    import re

    block = re.split(r"\n(?:Returns|Raises|Yields|Example)s?:", doc.split("Args:", 1)[1])[0]
    names: set[str] = set()
    for line in block.splitlines():
        m = re.match(r"^    (\*{0,2}[A-Za-z_]\w*(?:, \*{0,2}[A-Za-z_]\w*)*):", line)
        if m:
            names |= {n.lstrip("*") for n in m.group(1).split(", ")}
    return names


@pytest.mark.parametrize("name", sorted(set(ORDER)))
def test_args_block_lists_exactly_the_signature(name):
    """Every parameter documented, and nothing documented that the function lacks."""
    f = getattr(ckptavg, name)
    params = set(inspect.signature(f).parameters)
    documented = _documented(inspect.getdoc(f))
    assert (sorted(params - documented), sorted(documented - params)) == ([], []), name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """runs/a/epoch-0001..0006.safetensors: convnet_bn weights (random, a little apart),
    with the metadata ckptavg train writes for a run on the first 5,000 of the 6,000
    training images, the last 1,000 held out."""
    from ckptavg.nn.models import create_model

    root = tmp_path_factory.mktemp("world")
    os.makedirs(root / "runs" / "a")
    torch.manual_seed(0)
    base = create_model("convnet_bn", num_classes=10, in_channels=1).state_dict()
    for e in range(1, 7):
        state = {k: (v + 0.01 * e * torch.randn_like(v)) if v.is_floating_point() else v
                 for k, v in base.items()}
        ckptavg.save(state, root / "runs" / "a" / f"epoch-{e:04d}.safetensors", {
            "model.arch": "convnet_bn", "model.kwargs": "{}", "data.name": "fashion-mnist",
            "data.train_images": "5000", "data.holdout": "1000", "train.epoch": str(e),
            "bn.stale": "false"})
    return root


def test_every_example_runs_as_written(world, monkeypatch):
    monkeypatch.chdir(world)
    monkeypatch.setenv("CKPTAVG_DATA", demo_data_dir())
    parser, failures, ran = doctest.DocTestParser(), [], 0
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for name in ORDER:
        fn = getattr(ckptavg, name)
        module = inspect.getmodule(fn)
        globs = {**vars(module), "ckptavg": ckptavg, "os": os}
        test = parser.get_doctest(inspect.getdoc(fn), globs, name, module.__file__, 0)
        result = runner.run(test, out=lambda s: failures.append(s))
        ran += result.attempted
    assert not failures, "\n".join(failures)
    assert ran >= 40


@pytest.mark.parametrize("module", ["ckptavg.options", "ckptavg.io.metadata", "ckptavg.engine.plan",
                                    "ckptavg.engine.sweep"])
def test_module_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_scores_example_runs():
    from ckptavg.nn import evaluation

    test = doctest.DocTestParser().get_doctest(evaluation.scores.__doc__, vars(evaluation),
                                               "scores", evaluation.__file__, 0)
    result = doctest.DocTestRunner().run(test)
    assert result.failed == 0 and result.attempted == 3
