"""Inputs in object storage (issue #27), against a real S3 server: moto's server mode on
127.0.0.1, started here. Checked: the exact float64 mean of objects globbed remotely and of
sharded folders; a missing key named in one line; a connection dropped mid-body (through a
proxy on 127.0.0.1 that cuts it) retried, and failing in one line when it keeps dropping;
an object rewritten during the run refused; no credential in the output's metadata."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptavg
from ckptavg.errors import CkptavgError
from tests.conftest import ROOT

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

KEY_ID, SECRET = "testing-key-id", "testing-secret-value"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch):
    """A fresh bucket; the standard environment variables point s3fs at the local server."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"b{_free_port()}"
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=name)
    return name


def _put(bucket: str, key: str, path) -> None:
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(str(path), bucket, key)


def _put_folder(bucket: str, prefix: str, folder) -> None:
    for name in os.listdir(folder):
        _put(bucket, f"{prefix}/{name}", folder / name)


def _states(n=3):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        out.append({"w": torch.randn(3_000_000, generator=g),  # 12 MB: several windows
                    "b": torch.randn(7, generator=g).to(torch.bfloat16),
                    "n": torch.tensor(i)})
    return out


def _mean64(states):
    return {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[-1][k] for k in states[0]}


def _upload_run(tmp_path, bucket, states, prefix="run"):
    for i, s in enumerate(states):
        p = tmp_path / f"epoch-{i + 1:04d}.safetensors"
        save_file(s, str(p), metadata={"train.epoch": str(i + 1)})
        _put(bucket, f"{prefix}/epoch-{i + 1:04d}.safetensors", p)


def test_objects_globbed_remotely_average_to_the_exact_mean(tmp_path, bucket):
    states = _states()
    _upload_run(tmp_path, bucket, states)
    out = tmp_path / "avg.safetensors"
    r = ckptavg.average([f"s3://{bucket}/run/epoch-*.safetensors"], out)
    assert r.n == 3 and r.epochs == [1, 2, 3]
    got, want = load_file(str(out)), _mean64(states)
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = ckptavg.load(out)[1]
    assert KEY_ID not in json.dumps(meta) and SECRET not in json.dumps(meta)
    assert [e["file"] for e in json.loads(meta["average.inputs"])] == [
        "epoch-0001.safetensors", "epoch-0002.safetensors", "epoch-0003.safetensors"]


def _sharded_folder(state: dict, folder) -> None:
    """A folder of safetensors shards with its index, as ckptavg writes it."""
    src = folder.parent / f"{folder.name}.src.safetensors"
    save_file(state, str(src))
    ckptavg.average([src], folder, shard_size=5_000_000)


def _dcp_folder(state: dict, folder) -> None:
    """A DCP folder, as torch.distributed.checkpoint writes it (weights under 'model')."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


@pytest.mark.parametrize("make", [_sharded_folder, _dcp_folder], ids=["sharded", "dcp"])
def test_folders_in_s3_average_exactly(tmp_path, bucket, make):
    states = _states(2)
    for i, s in enumerate(states):
        folder = tmp_path / f"step-{i + 1}"
        make(s, folder)
        _put_folder(bucket, f"ckpt/step-{i + 1}", folder)
    out = tmp_path / "avg.safetensors"
    r = ckptavg.average([f"s3://{bucket}/ckpt/step-*/"], out)
    assert r.n == 2
    got, want = load_file(str(out)), _mean64(states)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_command_line_reads_s3_with_the_standard_credentials(tmp_path, bucket):
    states = _states(2)
    _upload_run(tmp_path, bucket, states)
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average",
                           f"s3://{bucket}/run/epoch-*.safetensors", "-o", str(out), "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 2
    assert SECRET not in proc.stdout + proc.stderr


def test_a_missing_key_is_named_in_one_line(tmp_path, bucket):
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average",
                           f"s3://{bucket}/run/nope.safetensors", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ckptavg: error: s3://{bucket}/run/nope.safetensors: no such object or folder in "
        "s3://; check the bucket, the key and the pattern"]


class _CuttingProxy:
    """A TCP proxy on 127.0.0.1 to the S3 server that closes the first `cuts` connections
    carrying a ranged GET after forwarding 64 KiB of the answer (a connection dropped
    mid-body); `cuts=None` cuts every one."""

    def __init__(self, target: str, cuts: int | None):
        self.host, self.port = target.split("//")[1].split(":")
        self.cuts, self.cut = cuts, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        upstream = socket.create_connection((self.host, int(self.port)))
        lock = threading.Lock()
        state = {"ranged": False, "sent": 0}

        def up():
            try:
                while data := client.recv(65536):
                    if b"\r\nrange:" in data.lower() or b"\r\nRange:" in data:
                        state["ranged"] = True
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                with lock:
                    if state["ranged"] and (self.cuts is None or self.cut < self.cuts) \
                            and state["sent"] + len(data) > 65536:
                        self.cut += 1
                        client.sendall(data[: max(0, 65536 - state["sent"])])
                        break
                    state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.sock.close()


def test_a_dropped_connection_is_retried(tmp_path, bucket, monkeypatch, s3):
    import s3fs

    states = _states(2)
    _upload_run(tmp_path, bucket, states)
    proxy = _CuttingProxy(s3, cuts=2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        out = tmp_path / "avg.safetensors"
        ckptavg.average([f"s3://{bucket}/run/epoch-*.safetensors"], out)
        assert proxy.cut == 2
        got, want = load_file(str(out)), _mean64(states)
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        proxy.close()


def test_a_connection_that_keeps_dropping_is_one_line(tmp_path, bucket, monkeypatch, s3):
    import s3fs

    from ckptavg.io import remote

    _upload_run(tmp_path, bucket, _states(2))
    proxy = _CuttingProxy(s3, cuts=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        out = tmp_path / "avg.safetensors"
        with pytest.raises(CkptavgError, match=r"epoch-0001.safetensors: reading bytes .* failed "
                           r"after 4 tries .*Check the connection and run again"):
            ckptavg.average([f"s3://{bucket}/run/epoch-*.safetensors"], out)
        assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    finally:
        proxy.close()


def test_an_object_rewritten_during_the_run_is_refused(tmp_path, bucket, monkeypatch):
    from ckptavg.engine import write as engine

    states = _states(2)
    _upload_run(tmp_path, bucket, states)
    real = engine.execute

    def execute_then_rewrite(plan, writer, keys=None, **kw):
        real(plan, writer, keys, **kw)
        save_file({k: v * 0 for k, v in states[1].items()}, str(tmp_path / "x.safetensors"))
        _put(bucket, "run/epoch-0002.safetensors", tmp_path / "x.safetensors")

    monkeypatch.setattr(engine, "execute", execute_then_rewrite)
    out = tmp_path / "avg.safetensors"
    with pytest.raises(CkptavgError, match="epoch-0002.safetensors: was modified while it was "
                       "being read"):
        ckptavg.average([f"s3://{bucket}/run/epoch-*.safetensors"], out)
    assert not out.exists()


def test_torch_files_in_s3_average_exactly_and_are_crc_checked(tmp_path, bucket):
    """torch.save training checkpoints (weights under 'state_dict', an optimizer beside
    them) are read in place: the exact mean; a byte flipped in a tensor record fails its
    CRC-32 in one line naming the object, and nothing is written."""
    states = _states()
    for i, s in enumerate(states):
        p = tmp_path / f"e{i}.ckpt"
        torch.save({"state_dict": s, "epoch": i + 1, "optimizer": {"m": torch.zeros(3)}}, p)
        _put(bucket, f"pt/epoch-{i + 1}.ckpt", p)
    out = tmp_path / "avg.safetensors"
    r = ckptavg.average([f"s3://{bucket}/pt/*.ckpt"], out)
    assert r.n == 3 and r.epochs == [1, 2, 3]
    got, want = load_file(str(out)), _mean64(states)
    assert all(torch.equal(got[k], want[k]) for k in want)
    bad = bytearray((tmp_path / "e1.ckpt").read_bytes())
    bad[len(bad) // 2] ^= 0xFF  # inside the 12 MB record of "w"
    (tmp_path / "bad.ckpt").write_bytes(bytes(bad))
    _put(bucket, "pt/epoch-2.ckpt", tmp_path / "bad.ckpt")
    out.unlink()
    with pytest.raises(CkptavgError, match=rf"s3://{bucket}/pt/epoch-2.ckpt: record .* fails "
                                           "its CRC-32 check"):
        ckptavg.average([f"s3://{bucket}/pt/*.ckpt"], out)
    assert not out.exists()


def test_a_legacy_torch_file_in_s3_is_one_line_naming_the_fix(tmp_path, bucket):
    torch.save({"w": torch.ones(2)}, tmp_path / "last.pt", _use_new_zipfile_serialization=False)
    _put(bucket, "run/last.pt", tmp_path / "last.pt")
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", f"s3://{bucket}/run/last.pt",
                           "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"ckptavg: error: s3://{bucket}/run/last.pt: this torch file needs torch's own loader "
        "(a legacy or compressed file, or tensors of a kind only torch reads), which reads "
        "local files only; copy it to local disk first, or save it as safetensors"]


def test_hugging_face_bin_folders_in_s3_average_exactly(tmp_path, bucket):
    """Folders of pytorch_model-*.bin shards with their index, as transformers writes them:
    the exact mean, into a folder output that gets the inputs' config.json."""
    states = _states(2)
    for i, s in enumerate(states):
        folder = tmp_path / f"checkpoint-{i + 1}"
        folder.mkdir()
        parts = [{"w": s["w"]}, {"b": s["b"], "n": s["n"]}]
        weight_map = {}
        for j, part in enumerate(parts):
            name = f"pytorch_model-0000{j + 1}-of-00002.bin"
            torch.save(part, folder / name)
            weight_map.update({k: name for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
        (folder / "config.json").write_text('{"model_type": "toy"}')
        (folder / "trainer_state.json").write_text(
            json.dumps({"epoch": float(i + 1), "global_step": 100 * (i + 1)}))
        _put_folder(bucket, f"hf/checkpoint-{i + 1}", folder)
    out = tmp_path / "merged"
    r = ckptavg.average([f"s3://{bucket}/hf/checkpoint-*/"], out)
    assert r.n == 2 and r.epochs == [1, 2]  # from each folder's trainer_state.json
    got, want = ckptavg.load(out)[0], _mean64(states)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'


def test_outputs_in_s3_appear_whole(tmp_path, bucket):
    """`-o s3://...`: a file, and a folder (its index uploaded last); read back from the
    server they are the exact mean; a folder prefix that exists is refused."""
    import s3fs

    states = _states(3)
    _upload_run(tmp_path, bucket, states)
    want = _mean64(states)
    src = f"s3://{bucket}/run/epoch-*.safetensors"
    r = ckptavg.average([src], f"s3://{bucket}/merged/swa.safetensors")
    assert r.output == f"s3://{bucket}/merged/swa.safetensors"
    got, meta = ckptavg.load(f"s3://{bucket}/merged/swa.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want) and meta["average.n"] == "3"
    ckptavg.average([src], f"s3://{bucket}/merged/folder/", shard_size=5_000_000)
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/merged/folder"))
    assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    got, _ = ckptavg.load(f"s3://{bucket}/merged/folder")
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CkptavgError, match="exists; a remote folder output is a new prefix"):
        ckptavg.average([src], f"s3://{bucket}/merged/folder/", shard_size=5_000_000)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_no_object_is_visible_after_a_kill(tmp_path, bucket):
    """kill -9 while the output is streamed (a multipart upload in flight, no local copy):
    nothing appears at the output URL."""
    import signal
    import time

    import boto3
    import s3fs

    big = [{f"t{j}": torch.full((1_000_000,), float(i)) for j in range(24)} for i in range(3)]
    _upload_run(tmp_path, bucket, big, prefix="big")
    dest = f"s3://{bucket}/out/avg.safetensors"
    tmp = tmp_path / "t"
    tmp.mkdir()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    proc = subprocess.Popen([sys.executable, "-m", "ckptavg", "average",
                             f"s3://{bucket}/big/epoch-*.safetensors", "-o", dest, "-q"],
                            cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)})
    t0, streaming = time.monotonic(), False  # kill once the upload has begun
    while time.monotonic() - t0 < 60 and proc.poll() is None and not streaming:
        streaming = bool(client.list_multipart_uploads(Bucket=bucket).get("Uploads"))
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert streaming
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists(dest.removeprefix("s3://"))
    assert os.listdir(tmp) == []  # streamed: no local copy was made


def test_a_failed_folder_output_leaves_no_object(tmp_path, bucket, monkeypatch):
    """A run that fails after some shards were uploaded (a NaN in the last tensor) removes
    them: the prefix stays empty, and the error is one line."""
    import s3fs

    from ckptavg.io import remote

    removed, real_remove = [], remote.remove

    def remove(urls):
        fs = s3fs.S3FileSystem()
        removed.extend(u for u in urls if fs.exists(u.removeprefix("s3://")))
        real_remove(urls)

    monkeypatch.setattr(remote, "remove", remove)
    states = [{k: torch.full((2_000_000,), float(i)) for k in "abz"} for i in range(2)]
    states[1]["z"][7] = float("nan")
    _upload_run(tmp_path, bucket, states, prefix="nan")
    with pytest.raises(CkptavgError, match="non-finite"):
        ckptavg.average([f"s3://{bucket}/nan/epoch-*.safetensors"], f"s3://{bucket}/o/f/",
                        shard_size=5_000_000)
    assert "model-00001-of-00003.safetensors" in [u.rsplit("/", 1)[1] for u in removed]
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists(f"{bucket}/o/f")


def test_a_torch_output_in_s3_is_streamed_and_loads(tmp_path, bucket):
    """`-o s3://.../swa.pt`: torch.load of the object gives the exact mean; no local space."""
    import s3fs

    states = _states(2)
    _upload_run(tmp_path, bucket, states)
    tmp = tmp_path / "t"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average",
                           f"s3://{bucket}/run/epoch-*.safetensors", "-o",
                           f"s3://{bucket}/out/swa.pt", "-q"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp) == []
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().get_file(f"{bucket}/out/swa.pt", str(tmp_path / "swa.pt"))
    got = torch.load(tmp_path / "swa.pt", weights_only=True)  # bare, as the inputs
    want = _mean64(states)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _peak_rss_of_average(urls: list[str], out) -> int:
    """The peak RSS (bytes) of a `ckptavg average` process of these objects: its own VmHWM
    (`--json`'s peak_rss_bytes; ru_maxrss would count this large process, forked)."""
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "average", *urls, "-o", str(out),
                           "--json"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["peak_rss_bytes"]


def test_read_ahead_stays_within_its_budget(tmp_path, bucket):
    """Many objects read at once share one read-ahead budget (128 MiB), measured: 200
    objects of 2 MiB each (before: two windows of at least 1 MiB each for each object)
    peak at the memory of 4 such objects plus the budget and the kernel's own buffers for
    32 inputs read at once; the mean stays exact."""
    from ckptavg.io import remote

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 19, generator=g)  # 2 MiB
    for i in range(200):
        p = tmp_path / f"epoch-{i + 1:04d}.safetensors"
        save_file({"w": base + i}, str(p), metadata={"train.epoch": str(i + 1)})
        _put(bucket, f"many/epoch-{i + 1:04d}.safetensors", p)
        p.unlink()
    urls = [f"s3://{bucket}/many/epoch-{i + 1:04d}.safetensors" for i in range(200)]
    few = _peak_rss_of_average(urls[:4], tmp_path / "few.safetensors")
    many = _peak_rss_of_average(urls, tmp_path / "many.safetensors")
    # beyond the budget: 32 inputs' staging buffers read at once (kernel.STAGE_BYTES x 2,
    # against 4 inputs'), the float64 sum of a group, and each open object's header and
    # state (measured at 300 objects: 171 MiB more in all, 378 MiB before the budget
    # counted every byte; at 200 objects: 163 MiB)
    assert many - few < remote.BUDGET + (64 << 20), (many >> 20, few >> 20)
    got = load_file(str(tmp_path / "many.safetensors"))["w"]
    want = sum((base + i).double() for i in range(200)) / 200  # of the float32 inputs
    assert torch.equal(got, want.float())
    # and in this process: every byte counted against the budget is given back
    ckptavg.average(urls[:40], tmp_path / "in.safetensors")
    assert remote._HELD[0] == 0 and remote._LIVE[0] == 0
    assert 0 < remote._PEAK[0] <= remote.BUDGET


def test_two_torchrun_ranks_read_s3_like_one_process(tmp_path, bucket):
    """Under torchrun each rank reads its share of the tensors from the objects itself
    (ranged GETs of its own byte spans): the folder it writes holds the one-process bytes."""
    from tests.distributed.conftest import torchrun

    states = _states(3)
    _upload_run(tmp_path, bucket, states)
    src = f"s3://{bucket}/run/epoch-*.safetensors"
    one = tmp_path / "one"
    ckptavg.average([src], one)
    two = tmp_path / "two"
    proc = torchrun("ckptavg", "average", src, "-o", two, "-q", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = ckptavg.load(one)[0], ckptavg.load(two)[0]
    want = _mean64(states)
    assert all(torch.equal(a[k], want[k]) and torch.equal(b[k], want[k]) for k in want)


def test_inspect_and_load_read_s3_too(tmp_path, bucket):
    states = _states(1)
    _upload_run(tmp_path, bucket, states)
    url = f"s3://{bucket}/run/epoch-0001.safetensors"
    info = ckptavg.inspect(url)
    assert info.format == "safetensors" and info.tensors == 3
    assert info.metadata["train.epoch"] == "1"
    got, meta = ckptavg.load(url)
    assert all(torch.equal(got[k], states[0][k]) for k in states[0])
    proc = subprocess.run([sys.executable, "-m", "ckptavg", "inspect", url, "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 3


def _counting(blob: bytes):
    """A store serving `blob` under any key, and the (start, end) of each GET it answered."""
    fetched, lock = [], threading.Lock()

    class Store:
        def cat_file(self, key, start, end):
            with lock:
                fetched.append((start, end))
            return blob[start:end]

    return Store(), fetched


def test_reads_over_small_gaps_use_the_window_fetched_ahead():
    """Records apart by a few bytes (a torch zip's local headers) are read through the
    window fetched in the background: every byte of the object is fetched once, and the
    bytes read are the object's (a store that counts its GETs, no server)."""
    from ckptavg.io.remote import RemoteFile, window_size

    blob = bytes(range(256)) * (160 * 1024)  # 40 MiB
    store, fetched = _counting(blob)

    f = RemoteFile("s3://b/k", 0, 0, len(blob), 0, fs=store, key="k", etag=None)
    try:
        pos, step, gap = 0, 3 << 20, 100
        while pos + step <= len(blob):
            view = bytearray(step)
            f.pread(memoryview(view), pos)
            assert bytes(view) == blob[pos:pos + step]
            pos += step + gap
    finally:
        f.close()
    assert sum(end - start for start, end in fetched) <= len(blob)
    # the first read's bytes in one GET of their own, then windows fetched ahead
    assert len(fetched) == 1 + -(-(len(blob) - step) // window_size())


def test_a_torch_file_of_many_records_opens_in_a_few_gets(tmp_path):
    """A torch file of 300 records (a ResNet's many tensors) opens with the GETs of its two
    ends, not one per record header: the records lie where torch's writer puts them, the
    first header read to confirm it and each other one confirmed through the read-ahead
    window as its record is read. Every tensor read that way is the file's (torch.load's),
    and the reads fetch each byte about once (a store that counts its GETs, no server)."""
    from ckptavg.io.pt import TorchReader
    from ckptavg.io.remote import EDGE, RemoteFile

    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(4000 + 7 * i, generator=g) for i in range(300)}
    torch.save({"state_dict": state}, tmp_path / "m.pt")  # 5.4 MB
    blob = (tmp_path / "m.pt").read_bytes()
    want = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    store, fetched = _counting(blob)

    r = TorchReader("s3://b/m.pt", file=RemoteFile("s3://b/m.pt", 0, 0, len(blob), 0,
                                                   fs=store, key="m.pt", etag='"etag"'))
    try:
        opened = list(fetched)
        assert sorted(opened) == [(0, EDGE), (len(blob) - EDGE, len(blob))]
        assert sorted(r.keys()) == sorted(state)
        for k in sorted(state, key=lambda k: int(k[5:-7])):  # in the file's order
            ext = r.locate(k)
            got = bytearray(want[k].nbytes)
            ckptavg.io.files.pread_extent(ext, memoryview(got))
            assert bytes(got) == want[k].numpy().tobytes()
            assert ext.check.header is None  # confirmed
        r.verify()
    finally:
        r.close()
    assert sum(end - start for start, end in fetched) <= len(blob) + 2 * EDGE


@pytest.mark.slow  # writes and reads a 4 GiB file: about 20 s
def test_records_past_4_gib_are_placed_as_torch_writes_them(tmp_path):
    """Records larger than 4 GiB and records beyond it (zip64 fields in their local
    headers): placed without reading their headers, confirmed as they are read, their bytes
    the file's (a store that reads the file on disk, no server)."""
    from ckptavg.io.pt import TorchReader
    from ckptavg.io.remote import RemoteFile

    path = tmp_path / "big-records1.pt"  # a name whose length puts record c's bytes one
    # alignment step further for its zip64 field than without it
    state = {"a": torch.arange(16.0), "big": torch.zeros((1 << 32) + 1000, dtype=torch.uint8),
             "c": torch.arange(100.0), "d": torch.arange(5.0)}
    state["big"][-1000:] = 7
    torch.save(state, path)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)

    class Store:
        def cat_file(self, key, start, end):
            return os.pread(fd, end - start, start)

    r = TorchReader("s3://b/big.pt", file=RemoteFile("s3://b/big.pt", 0, 0, size, 0, fs=Store(),
                                                     key="big.pt", etag='"etag"'))
    try:
        for k in ("a", "c", "d"):
            assert torch.equal(r.read(k), state[k])
        ext = r.locate("big")
        tail = bytearray(1000)
        ckptavg.io.files.pread_extent(ext, memoryview(tail), (1 << 32))
        assert bytes(tail) == b"\x07" * 1000 and ext.check.header is None
    finally:
        r.close()
        os.close(fd)


def _relaid(src, dst, padded: bool = True, moved: tuple[int, ...] = ()) -> None:
    """`src`'s records rewritten with Python's zipfile: with `padded`, each record's bytes
    where torch's writer puts them (after a padding extra field to the next multiple of 64),
    those of the records numbered in `moved` 64 bytes further; else no padding field."""
    import struct
    import zipfile

    with zipfile.ZipFile(src) as z_in, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z_out:
        for i, info in enumerate(z_in.infolist()):
            data = z_in.read(info)
            out = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            if padded:
                start = z_out.fp.tell() + 30 + len(info.filename) + 4
                n = -start % 64 + (64 if i in moved else 0)
                out.extra = b"FB" + struct.pack("<H", n) + b"Z" * n
            z_out.writestr(out, data)


def test_a_torch_file_laid_out_by_another_tool_is_read_or_refused_in_one_line(tmp_path):
    """In object storage: a torch file whose zip another tool rewrote (no padding fields)
    reads every header at open and averages exactly; one whose first record is where torch
    puts it but a later one is not (a hand-made zip) stops in one line naming the record
    and the fix, with no output. On local disk both average exactly (torch.load reads
    them too). fsspec's memory:// store, no server."""
    import fsspec

    fs = fsspec.filesystem("memory")
    states = [{f"t{j}": torch.randn(50_000 + j, generator=torch.Generator().manual_seed(10 * i + j))
               for j in range(6)} for i in range(2)]
    want = {k: ((states[0][k].double() + states[1][k].double()) / 2).float() for k in states[0]}
    for i, st in enumerate(states):
        torch.save(st, tmp_path / f"s{i}.pt")
    _relaid(tmp_path / "s0.pt", tmp_path / "plain.pt", padded=False)
    _relaid(tmp_path / "s0.pt", tmp_path / "moved.pt", moved=(8,))  # a data record past the first
    for name in ("plain.pt", "moved.pt"):
        assert all(torch.equal(torch.load(tmp_path / name, weights_only=True)[k], states[0][k])
                   for k in states[0])
        r = ckptavg.average([str(tmp_path / name), str(tmp_path / "s1.pt")],
                            tmp_path / f"{name}.safetensors")
        assert r.n == 2
        got = load_file(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)
    try:
        for name in ("plain.pt", "moved.pt", "s1.pt"):
            fs.put_file(str(tmp_path / name), f"/relaid/{name}")
        ckptavg.average(["memory://relaid/plain.pt", "memory://relaid/s1.pt"],
                        tmp_path / "remote-plain.safetensors")
        got = load_file(tmp_path / "remote-plain.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)
        with pytest.raises(CkptavgError) as e:
            ckptavg.average(["memory://relaid/moved.pt", "memory://relaid/s1.pt"],
                            tmp_path / "remote-moved.safetensors")
        line = str(e.value)
        assert "\n" not in line and "memory://relaid/moved.pt" in line
        assert "where torch.save puts it" in line and "Copy it to local disk first" in line
        assert not os.path.exists(tmp_path / "remote-moved.safetensors")
        assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    finally:
        fs.rm("/relaid", recursive=True)


def test_get_many_gives_each_span_its_bytes():
    """Spans in any order, overlapping, far apart, at both ends and empty: each answer is
    the object's bytes there; near ones share a GET, far ones do not."""
    from ckptavg.io.remote import GAP, RemoteFile

    blob = bytes(range(251)) * (100_000)  # 25 MB, no period of a power of two
    store, fetched = _counting(blob)

    f = RemoteFile("s3://b/k", 0, 0, len(blob), 0, fs=store, key="k", etag=None)
    spans = [(20_000_000, 30), (5, 10), (len(blob) - 7, 7), (300, 30), (310, 40), (0, 0),
             (20_000_000 + GAP // 2, 1000), (12_000_000, 4096)]
    try:
        got = f.get_many(spans)
    finally:
        f.close()
    assert got == [blob[o:o + n] for o, n in spans]
    assert len(fetched) == 4  # [0, 350), 12 MB, 20 MB and its neighbour, the last 7 bytes


def test_an_objects_ends_are_kept_by_version():
    """The ends of an object fetched once serve later small reads of it; the same name
    rewritten (another ETag) is fetched again, never answered from the old bytes."""
    from ckptavg.io.remote import EDGE, RemoteFile

    blobs = {'"v1"': bytes(range(256)) * 4096, '"v2"': bytes(range(255, -1, -1)) * 4096}
    fetched = []

    class Store:
        def __init__(self, etag):
            self.etag = etag

        def cat_file(self, key, start, end):
            fetched.append((self.etag, start, end))
            return blobs[self.etag][start:end]

    for etag in blobs:
        f = RemoteFile("s3://b/edge", 0, 0, 1 << 20, 0, fs=Store(etag), key="edge", etag=etag)
        for off, n in [(0, 8), (8, 100), (EDGE - 10, 10), ((1 << 20) - 30, 30), (500_000, 4)]:
            assert f.get(off, n) == blobs[etag][off:off + n]
        f.close()
    assert [(e, s) for e, s, _ in fetched] == [('"v1"', 0), ('"v1"', (1 << 20) - EDGE),
                                               ('"v1"', 500_000), ('"v2"', 0),
                                               ('"v2"', (1 << 20) - EDGE), ('"v2"', 500_000)]


def test_any_fsspec_store_reads_and_writes_the_same_way(tmp_path):
    """Nothing in the remote paths is S3's own: in fsspec's in-memory store (memory://: no
    ETag, its own listing, no server) a torch file, a safetensors object and a DCP folder
    average to the exact mean, into an output in that store."""
    import fsspec
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load

    fs = fsspec.filesystem("memory")
    states = _states(3)
    torch.save({"state_dict": states[0]}, tmp_path / "a.pt")
    save_file(states[1], str(tmp_path / "b.safetensors"))
    dcp.save(states[2], storage_writer=dcp.FileSystemWriter(str(tmp_path / "c")), no_dist=True)
    try:
        fs.put_file(str(tmp_path / "a.pt"), "/ckpt/run/a.pt")
        fs.put_file(str(tmp_path / "b.safetensors"), "/ckpt/run/b.safetensors")
        for name in os.listdir(tmp_path / "c"):
            fs.put_file(str(tmp_path / "c" / name), f"/ckpt/run/c/{name}")
        r = ckptavg.average(["memory://ckpt/run/a.pt", "memory://ckpt/run/b.safetensors",
                             "memory://ckpt/run/c/"], "memory://ckpt/out/avg.safetensors")
        assert r.n == 3
        got, want = load(fs.cat_file("/ckpt/out/avg.safetensors")), _mean64(states)
        assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        fs.rm("/ckpt", recursive=True)


def test_a_remote_folder_of_loose_files_names_the_pattern_to_pass(tmp_path, bucket):
    """A prefix holding checkpoints but no index is one line naming the glob to pass, as for
    a local folder; one file of a DCP folder names the folder."""
    states = _states(2)
    _upload_run(tmp_path, bucket, states, prefix="loose")
    with pytest.raises(CkptavgError) as e:
        ckptavg.inspect(f"s3://{bucket}/loose/")
    assert str(e.value) == (
        f"s3://{bucket}/loose: folder has no model.safetensors.index.json, model.safetensors, "
        "pytorch_model.bin.index.json, pytorch_model.bin or DCP .metadata (it holds: "
        "epoch-0001.safetensors, epoch-0002.safetensors); to average the files in it, pass "
        f"them: 's3://{bucket}/loose/*.safetensors'")
    with pytest.raises(CkptavgError, match=rf"pass the folder, s3://{bucket}/dcp/"):
        ckptavg.inspect(f"s3://{bucket}/dcp/__0_0.distcp")


def test_a_sweep_reads_objects_once_and_each_window_is_its_own_average(tmp_path, bucket):
    """`average --sweep` over objects in a store: every window written locally, bitwise what
    `average` of that window's objects gives; a remote sweep output is refused in one line."""
    states = _states(4)
    _upload_run(tmp_path, bucket, states)
    src = f"s3://{bucket}/run/epoch-*.safetensors"
    r = ckptavg.average([src], tmp_path / "sweep", sweep="window=2")
    assert len(r.windows) == 3
    for w in r.windows:
        alone = ckptavg.average(w.inputs, tmp_path / "alone.safetensors")
        got, want = load_file(w.output), load_file(alone.output)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ckptavg.OptionError, match="local"):
        ckptavg.average([src], f"s3://{bucket}/sweep/", sweep="window=2")
