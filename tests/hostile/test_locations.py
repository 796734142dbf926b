"""One identity for a location, whatever its spelling (issue #33, item 2): an output is
compared with the inputs by canonical location, so `s3a://B/k` is `s3://B/k`, `..` and `.`
segments, doubled and trailing slashes name the same object, `file://` is the local path,
and a symlinked folder or `..` reaches the same inode. Each refusal is one line and leaves
the input's bytes as they were."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_cli
from tests.test_remote import _put, bucket, s3  # noqa: F401 (fixtures)


def _local_inputs(tmp_path, n=2):
    paths = []
    for i in range(n):
        p = tmp_path / "run" / f"epoch-{i + 1}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_file({"w": torch.full((8,), float(i))}, str(p), metadata={"train.epoch": str(i + 1)})
        paths.append(p)
    return paths


def _digest(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _refused(proc) -> str:
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("spelling", [
    "file://{run}/epoch-1.safetensors", "{run}/../run/epoch-1.safetensors",
    "{run}/./epoch-1.safetensors", "{link}/epoch-1.safetensors", "{run}//epoch-1.safetensors",
])
def test_a_local_input_is_refused_as_the_output_whatever_its_spelling(tmp_path, spelling):
    paths = _local_inputs(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    before = _digest(paths[0])
    out = spelling.format(run=tmp_path / "run", link=tmp_path / "link")
    line = _refused(run_cli("average", *paths, "-o", out))
    assert "one of the inputs" in line, line
    assert _digest(paths[0]) == before


def test_a_file_url_is_the_local_path_for_inputs_and_outputs(tmp_path):
    paths = _local_inputs(tmp_path)
    out = tmp_path / "avg.safetensors"
    proc = run_cli("average", *[f"file://{p}" for p in paths], "-o", f"file://{out}")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(out))["w"], torch.full((8,), 0.5))
    assert not os.path.exists(os.path.join(ROOT, "file:"))


def _upload(tmp_path, bucket):  # noqa: F811
    paths = _local_inputs(tmp_path)
    for p in paths:
        _put(bucket, f"run/{p.name}", p)
    return [f"s3://{bucket}/run/{p.name}" for p in paths]


def _etag(bucket, key):  # noqa: F811
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return client.head_object(Bucket=bucket, Key=key)["ETag"]


@pytest.mark.parametrize("spelling", [
    "s3a://{b}/run/epoch-1.safetensors", "s3://{b}/run/./epoch-1.safetensors",
    "s3://{b}/x/../run/epoch-1.safetensors", "s3://{b}//run/epoch-1.safetensors",
])
def test_an_object_is_refused_as_the_output_whatever_its_spelling(tmp_path, bucket, spelling):  # noqa: F811
    urls = _upload(tmp_path, bucket)
    before = _etag(bucket, "run/epoch-1.safetensors")
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", *urls, "-o",
                           spelling.format(b=bucket)], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ.copy(), timeout=120)
    line = _refused(proc)
    assert "one of the inputs" in line, line
    assert _etag(bucket, "run/epoch-1.safetensors") == before


def test_one_object_under_two_spellings_is_one_input(tmp_path, bucket):  # noqa: F811
    urls = _upload(tmp_path, bucket)
    alias = urls[0].replace("s3://", "s3a://")
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", urls[0], alias, "-o",
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ.copy(), timeout=120)
    line = _refused(proc)
    assert "twice" in line or "counted twice" in line, line
