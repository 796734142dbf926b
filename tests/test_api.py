"""The public API as a Python caller meets it: lazy, documented, typed results."""

import dataclasses
import inspect
import subprocess
import sys

import ckptavg
from ckptavg.options import Split, Stats, choices
from tests.conftest import ROOT


def test_import_is_lazy_and_every_name_resolves():
    code = ("import sys, ckptavg; assert 'torch' not in sys.modules\n"
            "[getattr(ckptavg, n) for n in ckptavg.__all__]; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_public_function_documents_args_returns_example():
    for name in ckptavg.__all__:
        obj = getattr(ckptavg, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            for part in ("Args:", "Returns:", "Example:"):
                assert part in doc, f"{name} lacks {part}"


def test_commands_return_typed_results():
    for fn, result in [("average", "AverageResult"), ("inspect", "InspectResult"),
                       ("bn_fix", "BnFixResult"), ("evaluate", "EvalResult"),
                       ("ensemble", "EnsembleResult"), ("width", "WidthResult"),
                       ("replicate", "ReplicateResult")]:
        ret = inspect.signature(getattr(ckptavg, fn)).return_annotation
        assert ret == result, fn
        assert dataclasses.is_dataclass(getattr(ckptavg, result))
    from ckptavg.train import TrainResult, train

    assert inspect.signature(train).return_annotation == "TrainResult"
    assert dataclasses.is_dataclass(TrainResult)


def test_library_and_cli_defaults_are_one():
    """The CLI shows the defaults the library uses (batch 256 for eval, ensemble, width)."""
    from ckptavg.cli import cli

    for command, fn in [("eval", ckptavg.evaluate), ("ensemble", ckptavg.ensemble),
                        ("width", ckptavg.width), ("bn-fix", ckptavg.bn_fix)]:
        params = {p.name: p for p in cli.commands[command].params}
        lib = inspect.signature(fn).parameters
        for name in ("batch_size", "device", "workers", "seed", "stats", "split"):
            if name in params and name in lib:
                assert params[name].default == lib[name].default, (command, name)
    assert choices(Split) == ["train", "test"] and choices(Stats) == ["update_bn", "exact"]


def test_no_option_is_declared_twice_in_the_cli_source():
    src = open(f"{ROOT}/ckptavg/cli.py").read()
    for flag in ('"--json"', '"--quiet"', '"--device"', '"--model-kwargs"', '"--data-dir"',
                 '"--strip-prefix"', '"--key"', '"--input-key"', '"--workers"', '"--seed"'):
        assert src.count(flag) == 1, flag


def test_all_matches_the_lazy_table():
    assert sorted(ckptavg.__all__) == sorted([*ckptavg._API, "__version__"])


def test_no_public_name_is_also_a_submodule_name():
    """`import ckptavg.x` binds ckptavg.x to the module, hiding a function of that name."""
    for name, module in ckptavg._API.items():
        assert module != f"ckptavg.{name}", name
