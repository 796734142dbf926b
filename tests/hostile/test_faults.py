"""Every failure the machine or the user causes is one line, exit 1 (2 for usage), and
leaves no temporary file: a full disk, a read-only folder, FIFOs and devices as inputs, too
many inputs for the descriptor limit, corrupt data files, bad option values."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import ckptavg
from tests.conftest import ROOT, known_state, leftovers, reference_mean, run_cli, write_safetensors


def one_line_error(proc, *needles) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptavg: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def cli_with_limits(*args, fsize=None, nofile=None, timeout=120):
    def limits():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run([sys.executable, "-m", "ckptavg", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limits, timeout=timeout)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".ckpt", ".pth.tar", "",
                                    "dcp"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, suffix):
    """RLIMIT_FSIZE makes writes past 256 bytes fail (EFBIG) as a full disk would (ENOSPC):
    every output format, one line that names the output and the limit, no temporary file."""
    paths = write_safetensors(tmp_path, 3)
    out = tmp_path / ("out" if suffix == "dcp" else f"out{suffix}")
    extra = ["--dcp"] if suffix == "dcp" else []
    proc = cli_with_limits("average", *paths, "-o", out, *extra, fsize=256)
    one_line_error(proc, str(out), "cannot write the output", "size limit")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["bn-fix", "swag", "train"])
def test_disk_full_in_other_commands(tmp_path, command):
    from tests.fakedata import write_mnist

    data = tmp_path / "data"
    write_mnist(str(data), n_train=16, n_test=8)
    paths = write_safetensors(tmp_path, 3)
    out = tmp_path / ("out.pt" if command == "bn-fix" else "out.safetensors")
    from tests.fakedata import tiny_bn

    ck = tmp_path / "ck.safetensors"
    ckptavg.save(tiny_bn().state_dict(), ck, {"data.name": "fashion-mnist", "bn.stale": "true"})
    args = {"bn-fix": ["bn-fix", ck, "-o", out, "--data-dir", data, "--model",
                       "tests.fakedata:tiny_bn"],
            "swag": ["swag", *paths, "-o", out, "--rank", "2"],
            "train": ["train", "--data", "fashion-mnist", "--data-dir", data, "--model",
                      "tests.fakedata:tiny_bn",
                      "--epochs", "1", "-o", tmp_path / "run", "--batch-size", "8"]}[command]
    proc = cli_with_limits(*args, fsize=256)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("ckptavg: error: ")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "size limit" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # train's epoch lines come before
    assert not out.exists() and leftovers(tmp_path) == []
    if command == "train":
        assert leftovers(tmp_path / "run") == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _digests(paths) -> dict:
    """sha256 and mtime of each file: what "inputs unchanged" means."""
    import hashlib

    return {str(p): (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
            for p in paths}


def test_really_full_disk(tmp_path, tiny_fs):
    """docs/reliability.md: one line naming the fix, no output (not even a temporary file)
    left on the full file system, the inputs unchanged."""
    paths = []
    for i in range(2):  # 256 KB of output on a 64 KB file system
        paths.append(tmp_path / f"b{i}.safetensors")
        save_file({"w": torch.randn(64, 1024)}, paths[-1])
    before = _digests(paths)
    for out in ("o.safetensors", "o.pt", "o"):
        shard = ["--shard-size", "100KB"] if out == "o" else []  # a folder of 3 shards
        proc = run_cli("average", *paths, "-o", tiny_fs / out, *shard)
        one_line_error(proc, "No space left on device", "free space")
        assert os.listdir(tiny_fs) == [], out  # hidden temporaries included
    assert _digests(paths) == before


def test_read_only_folder(tmp_path, tiny_fs):
    """One line naming the fix; nothing appears on the read-only file system; the inputs
    are unchanged."""
    paths = write_safetensors(tmp_path, 2)
    before = _digests(paths)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    for out in ("o.safetensors", "o.pt", "o"):
        proc = run_cli("average", *paths, "-o", tiny_fs / out)
        one_line_error(proc, "Read-only file system", "pick a folder on a writable one")
        assert "free space" not in proc.stderr
        assert os.listdir(tiny_fs) == []
    assert _digests(paths) == before


def test_fifo_and_device_inputs_are_refused_without_hanging(tmp_path):
    good = write_safetensors(tmp_path, 1)[0]
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    one_line_error(run_cli("average", good, fifo, "-o", tmp_path / "o.safetensors", timeout=60),
                   "is a FIFO")
    one_line_error(run_cli("inspect", "/dev/zero", timeout=60), "character device")
    assert time.monotonic() - t0 < 60


def test_more_inputs_than_file_descriptors(tmp_path):
    """300 inputs under a limit of 64 descriptors: a mapping keeps no descriptor open."""
    n = 300
    for i in range(n):
        save_file({"w": torch.full((4,), float(i))}, tmp_path / f"e{i:04d}.safetensors")
    out = tmp_path / "avg.safetensors"
    proc = cli_with_limits("average", tmp_path / "e*.safetensors", "-o", out, nofile=64)
    assert proc.returncode == 0, proc.stderr
    got, _ = ckptavg.load(out)
    assert got["w"].tolist() == [sum(range(n)) / n] * 4


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gzip_data_file(tmp_path, damage):
    from tests.fakedata import write_mnist

    data = tmp_path / "data"
    write_mnist(str(data))
    gz = data / "train-images-idx3-ubyte.gz"
    raw = gz.read_bytes()
    gz.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x1f\x8b" + b"x" * 100)
    ck = tmp_path / "m.safetensors"
    from tests.fakedata import tiny_bn

    ckptavg.save(tiny_bn().state_dict(), ck)
    proc = run_cli("bn-fix", ck, "--model", "tests.fakedata:tiny_bn", "--data", "fashion-mnist",
                   "--data-dir", data)
    one_line_error(proc, str(gz), "corrupt or incomplete")


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--workers", "-1"]])
def test_bad_option_values_are_usage_errors(tmp_path, args):
    p = write_safetensors(tmp_path, 1)[0]
    proc = run_cli("eval", p, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Invalid value" in proc.stderr


def test_key_for_a_safetensors_input(tmp_path):
    p = write_safetensors(tmp_path, 1)[0]
    one_line_error(run_cli("average", p, "--key", "state_dict_ema", "-o", tmp_path / "o.pt"),
                   p, "no entry 'state_dict_ema'")


def test_input_rewritten_in_place_during_the_run_is_detected(tmp_path, monkeypatch):
    """Same inode, new bytes (a trainer overwriting its file in place): refused, no output."""
    from ckptavg.engine import write as averaging

    paths = write_safetensors(tmp_path, 2)
    real = averaging.execute

    def execute_then_rewrite(plan, writer, keys=None, progress=None, **kw):
        real(plan, writer, keys, progress, **kw)
        with open(paths[1], "r+b") as f:  # same size, new mtime
            f.seek(0, 2)
            f.seek(f.tell() - 1)
            f.write(b"\x00")
        os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))

    monkeypatch.setattr(averaging, "execute", execute_then_rewrite)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ckptavg.CkptavgError, match="modified while it was being read"):
        ckptavg.average(paths, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_input_replaced_between_open_and_read_keeps_the_opened_file(tmp_path):
    """A file renamed over an input after it was opened (header read) is never mixed in:
    the data comes from the file whose header was read."""
    paths = write_safetensors(tmp_path, 1)
    r = ckptavg.open_checkpoint(paths[0])
    other = tmp_path / "other.safetensors"
    save_file({k: v * 0 + 1e33 if v.is_floating_point() else v for k, v in known_state(9).items()}, other)
    os.replace(other, paths[0])
    try:
        for k in r.keys():
            assert torch.equal(r.read(k), known_state(1)[k])
    finally:
        r.close()


def test_reference_mean_of_many_inputs_under_fd_limit_in_process(tmp_path):
    """The same in-process, checking every tensor against the float64 reference."""
    paths = write_safetensors(tmp_path, 40)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Fewer free descriptors than inputs, whatever earlier tests of this process hold open
    # (an S3 client's connections).
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(32, len(os.listdir("/proc/self/fd")) + 24),
                                                hard))
    try:
        ckptavg.average(paths, tmp_path / "o.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got, _ = ckptavg.load(tmp_path / "o.safetensors")
    want = reference_mean([known_state(i) for i in range(1, 41)])
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_input_truncated_during_the_run_is_one_error_not_sigbus(tmp_path, suffix):
    """A trainer truncating a checkpoint while it is averaged: reading a mapped page past the
    new end of file would kill the process with SIGBUS (leaving its temporary output behind);
    the engine reads with pread, so it is one clear error and nothing is left. Run as a real
    subprocess so that a SIGBUS would show as the exit status."""
    script = tmp_path / "run.py"
    script.write_text(f'''
import os, sys, torch, ckptavg
d = sys.argv[1]
paths = []
for i in range(2):
    state = {{f"t{{k}}": torch.full((1 << 18,), float(i + k)) for k in range(8)}}
    p = os.path.join(d, f"e{{i}}{suffix}")
    torch.save(state, p) if p.endswith(".pt") else ckptavg.save(state, p)
    paths.append(p)
def progress(done, total):  # after the first tensor: cut the second input to a third
    if not os.environ.get("CUT"):
        os.environ["CUT"] = "1"
        os.truncate(paths[1], os.path.getsize(paths[1]) // 3)
try:
    ckptavg.average(paths, os.path.join(d, "out.safetensors"), progress=progress)
except ckptavg.CkptavgError as e:
    print(e)
''')
    data = tmp_path / "d"
    data.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(data)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert f"e1{suffix}: ended at byte" in proc.stdout and "nothing was written" in proc.stdout
    assert sorted(os.listdir(data)) == [f"e0{suffix}", f"e1{suffix}"]
