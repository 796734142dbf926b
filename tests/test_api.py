"""The public API as a Python caller meets it: lazy, documented, typed results."""

import dataclasses
import inspect
import os
import subprocess
import sys

import click
import pytest

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


def _visible(command):
    from ckptavg.cli import cli

    return [p for p in cli.commands[command].params
            if isinstance(p, click.Option) and not p.hidden]


def _default(p):
    """An option's default as the command sees it (Click marks "none given" with a sentinel)."""
    return None if type(p.default).__name__ == "Sentinel" else p.default


def test_library_and_cli_defaults_are_one():
    """Every option a command builds from a library options class shows that class's
    default, and train shows TrainConfig's: compared field by field with the dataclasses'
    own defaults, not with the decorator's idea of them."""
    import dataclasses

    from ckptavg.cli import cli
    from ckptavg.options import DataOptions, HeldOutOptions, LoaderOptions, Reading, Selection
    from ckptavg.train.config import TrainConfig

    expected = {}
    for cls in (Reading, Selection, DataOptions, LoaderOptions, HeldOutOptions):
        for f in dataclasses.fields(cls):
            expected[f.name] = f.default
    checked = 0
    for command in ("eval", "ensemble", "bn-fix", "soup", "search", "swag", "inspect", "average"):
        for p in _visible(command):
            if p.name in expected and p.name not in ("seed", "stats"):
                assert _default(p) == expected[p.name], (command, p.name)
                checked += 1
    assert checked > 60
    train = {p.name: p for p in _visible("train")}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            assert _default(train[f.name]) == f.default, f.name
    assert train["batch_size"].default == 128 and train["lr"].default == 0.05
    assert {p.name: p for p in _visible("eval")}["batch_size"].default == 256
    assert choices(Split) == ["train", "test"] and choices(Stats) == ["update_bn", "exact"]
    assert cli.commands["train"].params  # the command exists


def test_each_flag_has_one_meaning_across_commands():
    """A flag spelled by several commands sets one library parameter everywhere (the old
    `--subset` meant four things, `--threads` two); `-o/--output` is where each command
    writes, whatever its parameter is called."""
    from ckptavg.cli import cli

    meaning: dict[str, set] = {}
    for name in cli.commands:
        for p in _visible(name):
            for flag in p.opts + p.secondary_opts:
                meaning.setdefault(flag, set()).add(p.name)
    several = {f: m for f, m in meaning.items() if len(m) > 1 and f not in ("-o", "--output")}
    assert several == {}
    # and what the introspected app shows of each flag: one type, one range, one set of
    # choices, flag or not, in every command that has it (help may say it in context)
    shown: dict[str, set] = {}
    for name in cli.commands:
        for p in _visible(name):
            t = p.type
            seen = (type(t).__name__, getattr(t, "min", None), getattr(t, "min_open", None),
                    getattr(t, "max", None), tuple(getattr(t, "choices", ()) or ()), p.is_flag,
                    p.multiple, p.nargs)
            for flag in p.opts + p.secondary_opts:
                shown.setdefault(flag, set()).add(seen)
    assert {f: s for f, s in shown.items() if len(s) > 1} == {}
    assert "--subset" not in meaning and "--threads" not in meaning and "--out" not in meaning
    for flag in ("--eval-images", "--bn-images", "--arith-threads", "--torch-threads"):
        assert flag in meaning, flag


def test_all_matches_the_lazy_table():
    assert sorted(ckptavg.__all__) == sorted([*ckptavg._API, "__version__"])


def test_no_public_name_is_also_a_submodule_name():
    """`import ckptavg.x` binds ckptavg.x to the module, hiding a function of that name."""
    for name, module in ckptavg._API.items():
        assert module != f"ckptavg.{name}", name


def test_replicate_takes_a_fraction_for_the_swa_start_as_train_does(tmp_path):
    """--swa-start is one type in every command: train and replicate both take an epoch or
    a fraction of the budget below 1 (checked before any training starts)."""
    from ckptavg.errors import OptionError

    with pytest.raises(OptionError, match="swa_start 2.5"):
        ckptavg.replicate("fashion-mnist", str(tmp_path), overrides={"swa_start": 2.5})
    # 0.5 of a budget of 2 is epoch 1: accepted, then the next check (the budget rows) speaks
    with pytest.raises(OptionError, match="use a budget of 4 or more"):
        ckptavg.replicate("fashion-mnist", str(tmp_path), overrides={"swa_start": 0.5, "budget": 2})
    with pytest.raises(OptionError, match="the SWA start 9 must be within the budget 8"):
        ckptavg.replicate("fashion-mnist", str(tmp_path), overrides={"swa_start": 9, "budget": 8})


def test_every_public_result_is_a_result():
    """--json prints `to_dict()` of a `Result`, for every command's result type."""
    from ckptavg.results import Result

    names = [n for n in ckptavg.__all__ if n.endswith("Result")]
    assert "AverageResult" in names and "VerifyResult" in names
    for n in names:
        assert issubclass(getattr(ckptavg, n), Result), n


ROOT_MODULES = {"errors", "options", "results", "parallel", "plots", "version", "lazy",
                "__main__"}
LAYERS = ["cli", "experiments", "train", "selection", "nn", "engine", "io", "root"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ckptavg":
        return None
    if len(parts) == 1:
        return "face"
    return parts[1] if parts[1] in LAYERS else "root" if parts[1] in ROOT_MODULES else "?"


def test_imports_point_one_way():
    """docs/design.md's import directions, read from every import of every module (lazy
    ones inside functions included): cli -> experiments -> train -> selection -> nn ->
    engine -> io -> the root modules; nn never imports engine, nothing below cli imports
    the package face (`from ckptavg import options` names a root module)."""
    import ast

    package = os.path.join(ROOT, "ckptavg")
    wrong = []
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
            me = _layer(module)
            if me in ("face", None) or module == "ckptavg.__main__":
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    targets = [f"{node.module}.{a.name}" if node.module == "ckptavg" else
                               node.module for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for target in targets:
                    it = _layer(target)
                    if it is None:
                        continue
                    bad = it in ("face", "?") or LAYERS.index(it) < LAYERS.index(me) \
                        or (me == "nn" and it == "engine")
                    if bad:
                        wrong.append(f"{module} imports {target} (line {node.lineno})")
    assert wrong == []


def test_train_config_declares_no_flag_another_options_class_declares():
    """TrainConfig takes the flags other commands share from their options classes
    (`options.same`): names, type, range, choices and old spellings are those of the one
    declaration; only the help may speak of the run."""
    import dataclasses

    from ckptavg import options as o
    from ckptavg.train.config import TrainConfig

    declared = {}
    for cls in (o.Reading, o.Selection, o.ModelOptions, o.DataOptions, o.LoaderOptions,
                o.HeldOutOptions):
        for f in dataclasses.fields(cls):
            for name in f.metadata["flag"].names:
                declared[name] = f.metadata["flag"]
    shared = 0
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata["flag"]
        theirs = {declared[n] for n in flag.names if n in declared}
        if not theirs:
            continue
        shared += 1
        (one,) = theirs
        assert dataclasses.replace(flag, help=one.help) == one, f.name
    assert shared == 9


def test_engine_functions_stay_small():
    """docs/design.md: no function of engine/ is over 80 lines or takes more than 10
    parameters, but the public `average()` (its keywords are the API)."""
    import ast

    big = []
    folder = os.path.join(ROOT, "ckptavg", "engine")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                          if p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if (lines > 80 or len(params) > 10) and (name, node.name) != ("average.py",
                                                                              "average"):
                    big.append(f"{name}:{node.name} ({lines} lines, {len(params)} params)")
    assert big == []
