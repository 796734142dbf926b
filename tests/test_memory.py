"""The streaming promise, measured as the OS reports it: the rise of peak RSS above the
post-import RSS does not grow with the number of inputs and stays within a few tensors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from tests.conftest import ROOT

PROBE = r"""
import json, resource, sys
import ckptavg.engine.average as a
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
a.average(sys.argv[2:], sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rise": (peak - base) * 1024}))
"""

TENSOR = 8 << 20  # 8M float32 values: 32 MiB, the largest tensor


def rise(tmp_path, n: int) -> int:
    paths = []
    for i in range(n):
        p = tmp_path / f"n{n}-{i}.safetensors"
        save_file({"big": torch.full((TENSOR,), float(i)), "b": torch.full((2, TENSOR // 4), 1.0),
                   "small": torch.ones(10)}, p)
        paths.append(str(p))
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / f"out{n}.safetensors"), *paths],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["rise"]


def test_peak_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    largest = TENSOR * 4
    r2, r8 = rise(tmp_path, 2), rise(tmp_path, 8)
    assert r8 <= r2 + largest // 2, (r2, r8)  # N x 4 more input bytes, no more memory
    # float64 sum + float64 cast + output + the mapped input tensor: about 6 x largest
    assert r8 <= 8 * largest, (r8, largest)
