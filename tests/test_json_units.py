"""--json: every float a result carries has its unit in docs/json.md, and floats carry no
binary noise."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

import pytest

from ckptavg.cli.app import main
from tests.conftest import ROOT, write_safetensors

RESULTS = {
    "ckptavg.engine.result": ["AverageResult"],
    "ckptavg.nn.bn": ["BnFixResult", "Recalibration"],
    "ckptavg.nn.evaluation": ["EvalResult", "Scores"],
    "ckptavg.io.checkpoint": ["InspectResult", "TensorEntry", "Quantization"],
    "ckptavg.nn.calibration": ["CalibrationScores", "ReliabilityBin"],
    "ckptavg.experiments.ensemble": ["EnsembleResult", "Member"],
    "ckptavg.experiments.width": ["WidthResult", "WidthSummary", "WidthPoint"],
    "ckptavg.selection.soup": ["SoupResult", "Ingredient"],
    "ckptavg.selection.search": ["SearchResult", "Window"],
    "ckptavg.selection.profile_search": ["ProfileSearchResult", "ProfileScore"],
    "ckptavg.selection.swag": ["SwagResult", "SwagEvalResult", "CalibrationRow"],
    "ckptavg.train.loop": ["TrainResult"],
    "ckptavg.experiments.replicate": ["ReplicateResult"],
    "ckptavg.experiments.beyond": ["BeyondResult", "SelectionRow", "CalibrationSummary"],
    "ckptavg.results": ["MeanStd"],
}


def test_every_float_field_of_every_result_has_its_unit_documented():
    doc = open(os.path.join(ROOT, "docs", "json.md")).read()
    documented = set(re.findall(r"`([a-z_]+)`", doc))
    missing = []
    for module, names in RESULTS.items():
        mod = importlib.import_module(module)
        for name in names:
            for f in dataclasses.fields(getattr(mod, name)):
                if "float" in str(f.type) and f.name not in documented:
                    missing.append(f"{name}.{f.name}")
    assert not missing, f"float fields with no unit in docs/json.md: {missing}"


def test_json_floats_carry_no_binary_noise(capsys, tmp_path):
    files = write_safetensors(str(tmp_path), 5)
    with pytest.raises(SystemExit) as e:
        main(["average", *files, "--dry-run", "--json"])
    assert e.value.code == 0
    body = json.loads(capsys.readouterr().out)
    raw = 1 / sum(w * w for w in [0.2] * 5)
    assert raw != 5.0  # the noise the JSON must not show
    assert body["effective_n"] == 5.0 and body["weights"] == [0.2] * 5
