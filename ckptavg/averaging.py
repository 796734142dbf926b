"""The streaming engine: plan the run, then walk tensor by tensor.

For each key the tensor is read from every input in turn and folded into one float64 (or
float32) accumulator, so peak memory is a few tensors: never the model, never the number
of inputs. Integer and bool tensors are not averaged: the newest input's value is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ckptavg import __version__
from ckptavg.errors import CkptavgError, MismatchError, NonFiniteError, OutputError
from ckptavg.io.reader import Reader, open_checkpoint
from ckptavg.io.writer import TensorSpec, make_writer, output_kind
from ckptavg.select import Candidate, expand, select

Progress = Callable[[int, int], None]
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
SHOWN = 3  # problems listed per file in a mismatch error


@dataclass
class AverageResult:
    """What a run did (or, for a dry run, would do)."""

    inputs: list[str]
    weights: list[float]
    method: str
    output: str | None
    n: int
    tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    dry_run: bool = False
    epochs: list[int | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_bytes() -> int:
    """Maximum resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def method_weights(n: int, method: str, weights: Sequence[float] | None = None,
                   decay: float | None = None) -> list[float]:
    """Normalised per-input weights, oldest first.

    Args:
        n: number of inputs.
        method: "uniform", "weighted" (uses `weights`) or "ema" (uses `decay`).

    EMA follows torch's AveragedModel: the first input starts the average and each later one
    is folded in as `avg = decay * avg + (1 - decay) * w`, so the newest weighs most.
    """
    if method == "uniform":
        return [1.0 / n] * n
    if method == "weighted":
        ws = [float(w) for w in weights or []]
        if len(ws) != n:
            raise CkptavgError(f"--weights has {len(ws)} values for {n} inputs; give one per input")
        if any(w < 0 or not math.isfinite(w) for w in ws) or sum(ws) <= 0:
            raise CkptavgError("--weights must be finite, non-negative and not all zero")
        total = sum(ws)
        return [w / total for w in ws]
    if method == "ema":
        if decay is None or not 0.0 <= decay < 1.0:
            raise CkptavgError(f"--ema {decay}: the decay must be in [0, 1)")
        return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)]
    raise CkptavgError(f"unknown averaging method {method!r}")


def _check_inputs(readers: list[Reader]) -> list[str]:
    """Problems (one string per file) where an input differs from the first."""
    ref = readers[0]
    ref_keys = ref.keys()
    ref_set = set(ref_keys)
    problems = []
    for r in readers[1:]:
        keys = set(r.keys())
        parts = []
        missing = [k for k in ref_keys if k not in keys]
        extra = [k for k in r.keys() if k not in ref_set]
        if missing:
            parts.append(f"missing {len(missing)} key(s) ({', '.join(missing[:SHOWN])})")
        if extra:
            parts.append(f"extra {len(extra)} key(s) ({', '.join(extra[:SHOWN])})")
        diffs = []
        for k in ref_keys:
            if k not in keys:
                continue
            a, b = ref.info(k), r.info(k)
            if a.shape != b.shape:
                diffs.append(f"{k} {list(b.shape)} vs {list(a.shape)}")
            elif a.dtype.is_floating_point != b.dtype.is_floating_point or (
                not a.dtype.is_floating_point and a.dtype != b.dtype
            ):
                diffs.append(f"{k} {b.dtype} vs {a.dtype}".replace("torch.", ""))
        if diffs:
            parts.append(f"{len(diffs)} shape/dtype difference(s) ({', '.join(diffs[:SHOWN])})")
        if parts:
            problems.append(f"{r.path}: {'; '.join(parts)}")
    return problems


def _carried_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    """model.* and data.* entries on which every input agrees."""
    out = {}
    for k, v in metas[0].items():
        if k.startswith(("model.", "data.")) and all(m.get(k) == v for m in metas[1:]):
            out[k] = v
    return out


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _open_all(paths: list[str], key: str | None, strip_prefix: str | None) -> list[Reader]:
    readers: list[Reader] = []
    try:
        for p in paths:
            readers.append(open_checkpoint(p, key=key, strip_prefix=strip_prefix))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def average(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    ema: float | None = None,
    into: str | os.PathLike | None = None,
    from_epoch: int | None = None,
    to_epoch: int | None = None,
    last: int | None = None,
    every: int | None = None,
    cycle_ends: bool = False,
    key: str | None = None,
    strip_prefix: str | None = None,
    accumulate: str = "float64",
    dtype: str | None = None,
    shard_size: int | None = None,
    allow_nonfinite: bool = False,
    hash_inputs: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> AverageResult:
    """Average checkpoints into one, streaming one tensor at a time.

    Args:
        inputs: checkpoint paths or glob patterns (safetensors, sharded folders, torch files).
        output: where to write; the suffix picks the format (.safetensors, .pt, a folder).
            With `into` and no output, the running average is updated in place.
        weights: one weight per selected input (normalised); `ema` a decay instead.
        into: an existing average (with `average.n` metadata) to fold the inputs into:
            the result equals averaging all of its inputs and the new ones at once.
        from_epoch, to_epoch, last, every, cycle_ends: input selection (see select.py).
        accumulate: "float64" (default) or "float32".
        dtype: output dtype for floating tensors; default: each tensor's input dtype.

    Returns:
        An `AverageResult` with inputs, weights, sizes, time and peak memory.

    Example:
        >>> ckptavg.average(["runs/a/epoch-0126.safetensors", ...], "swa.safetensors")
    """
    t0 = time.perf_counter()
    if weights is not None and ema is not None:
        raise CkptavgError("--weights and --ema exclude each other; pick one")
    if accumulate not in ("float64", "float32"):
        raise CkptavgError(f"--accumulate {accumulate}: use float64 or float32")
    out_dtype = None
    if dtype is not None:
        if dtype not in OUT_DTYPES:
            raise CkptavgError(f"--dtype {dtype}: use one of {', '.join(OUT_DTYPES)}")
        out_dtype = OUT_DTYPES[dtype]
    if into is not None:
        into = os.fspath(into)
        if not os.path.exists(into):
            raise CkptavgError(f"{into}: no such file; --into needs an existing average "
                               "(make the first one with -o)")
        output = into if output is None else output
        if weights is not None or ema is not None:
            raise CkptavgError("--into folds a uniform running mean; drop --weights/--ema")
    if output is None and not dry_run:
        raise CkptavgError("no output given; pass -o OUT (.safetensors, .pt or a folder)")
    output = os.fspath(output) if output is not None else None
    if output is not None:
        output_kind(output, shard_size)  # a bad suffix fails before any reading

    paths = expand([os.fspath(p) for p in inputs])
    if not paths:
        raise CkptavgError("no input checkpoints given")
    cands = []
    for p in paths:
        with open_checkpoint(p, key=key, strip_prefix=strip_prefix) as r:
            cands.append(Candidate(p, r.metadata()))
    chosen = select(cands, from_epoch, to_epoch, cycle_ends, every, last)
    paths = [c.path for c in chosen]
    if output is not None:
        for p in paths + ([into] if into and not _same_file(into, output) else []):
            if _same_file(p, output) or os.path.realpath(p) == os.path.realpath(output):
                raise OutputError(f"{output}: is one of the inputs; write the average elsewhere")

    method = "ema" if ema is not None else "weighted" if weights is not None else "uniform"
    norm = method_weights(len(paths), method, weights, ema)
    raw = list(norm) if method != "uniform" else [1.0] * len(paths)
    prior_inputs: list = []
    all_paths = list(paths)
    if into is not None:
        with open_checkpoint(into) as r:
            meta = r.metadata()
        n0 = meta.get("average.n", "")
        if not n0.isdigit() or int(n0) < 1:
            raise CkptavgError(
                f"{into}: no average.n metadata, so the number of checkpoints in it is unknown; "
                "--into needs a file written by ckptavg average"
            )
        raw = [float(n0)] + raw
        all_paths = [into] + paths
        try:
            prior_inputs = json.loads(meta.get("average.inputs", "[]"))
        except json.JSONDecodeError:
            prior_inputs = []
    total_w = sum(raw)

    readers = _open_all(all_paths, key, strip_prefix)
    try:
        problems = _check_inputs(readers)
        if problems:
            raise MismatchError(
                f"inputs do not match {readers[0].path}: " + " | ".join(problems)
                + " -- average checkpoints of one architecture, or align keys with --strip-prefix"
            )
        ref = readers[0]
        keys = ref.keys()
        ties = dict(ref.ties())
        for r in readers[1:]:
            other = r.ties()
            ties = {k: v for k, v in ties.items() if other.get(k) == v}
        specs = []
        for k in keys:
            info = ref.info(k)
            dt = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
            specs.append(TensorSpec(k, info.shape, dt))
        n_total = (int(raw[0]) + len(paths)) if into is not None else len(paths)
        bytes_in = sum(r.info(k).nbytes if r.info(k).dtype.is_floating_point or r is readers[-1]
                       else 0 for r in readers for k in keys)
        result = AverageResult(
            inputs=paths, weights=norm, method=method, output=output, n=n_total,
            tensors=len(keys), bytes_in=bytes_in, bytes_out=sum(s.nbytes for s in specs),
            dry_run=dry_run, epochs=[c.epoch for c in chosen],
        )
        if dry_run:
            result.seconds = time.perf_counter() - t0
            result.peak_rss_bytes = peak_rss_bytes()
            return result

        entries = [{"file": os.path.basename(p.rstrip(os.sep))} for p in paths]
        if hash_inputs:
            for e, p in zip(entries, paths):
                e["sha256"] = sha256_of(p)
        metadata = {
            "ckptavg.version": __version__,
            **_carried_metadata([r.metadata() for r in readers]),
            "average.n": str(n_total),
            "average.method": method,
            "average.weights": json.dumps(
                [1.0 / n_total] * n_total if into is not None else norm),
            "average.inputs": json.dumps(prior_inputs + entries),
            "average.accumulate": accumulate,
            "bn.stale": "true",
        }
        writer = make_writer(output, specs, metadata, shard_size, ties)
        try:
            _stream(readers, specs, raw, total_w, accumulate, writer, ties, allow_nonfinite,
                    progress, bytes_in)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        for r in readers:
            r.close()
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _stream(readers, specs, raw, total_w, accumulate, writer, ties, allow_nonfinite,
            progress, bytes_in) -> None:
    """The tensor-major loop.

    Scratch buffers sized for the largest tensor are reused for every key: one for the
    running sum, one for the converted input (a mixed-dtype in-place add is several times
    slower than a cast followed by a same-dtype add), one for the output when the writer
    does not keep it. Inputs are read as views of their mapped files.
    """
    float_specs = [s for s in specs if readers[0].info(s.key).dtype.is_floating_point]
    max_numel = max((readers[0].info(s.key).numel for s in float_specs), default=0)
    acc_dtype = torch.float64 if accumulate == "float64" else torch.float32
    if any(readers[0].info(s.key).dtype == torch.float64 for s in float_specs):
        acc_dtype = torch.float64
    acc_buf = torch.empty(max_numel, dtype=acc_dtype)
    cast_buf = torch.empty(max_numel, dtype=acc_dtype)
    out_bytes = max((s.nbytes for s in float_specs), default=0)
    out_buf = None if writer.keeps_tensors else torch.empty(out_bytes, dtype=torch.uint8)
    done = 0
    last = readers[-1]
    for spec in specs:
        if writer.keeps_tensors and spec.key in ties:
            continue  # the torch writer points tied names at one tensor
        info = readers[0].info(spec.key)
        if not info.dtype.is_floating_point:
            value = last.read(spec.key).clone()
            last.release(spec.key)
            done += info.nbytes
            writer.write(spec.key, value.to(spec.dtype))
            if progress:
                progress(done, bytes_in)
            continue
        acc = acc_buf[: info.numel].view(info.shape)
        cast = cast_buf[: info.numel].view(info.shape)
        for i, (r, w) in enumerate(zip(readers, raw)):
            t = r.read(spec.key)
            if i == 0:
                acc.copy_(t)
                if w != 1.0:
                    acc.mul_(w)
            else:
                cast.copy_(t)
                acc.add_(cast, alpha=w) if w != 1.0 else acc.add_(cast)
            r.release(spec.key)
            done += r.info(spec.key).nbytes
            if progress:
                progress(done, bytes_in)
        # A sum of finite values is finite, so one reduction checks the whole tensor.
        if not allow_nonfinite and not bool(torch.isfinite(acc.sum(dtype=torch.float64))):
            if not bool(torch.isfinite(acc).all()):
                _raise_nonfinite(readers, spec.key)
        acc.div_(total_w)
        if out_buf is None:
            out = acc.to(spec.dtype, copy=True)  # the writer keeps it; acc is reused
        else:
            out = out_buf[: spec.nbytes].view(spec.dtype).view(spec.shape)
            out.copy_(acc)
        writer.write(spec.key, out)


def _raise_nonfinite(readers, key) -> None:
    for r in readers:
        t = r.read(key)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n = int(bad.sum())
            r.release(key)
            raise NonFiniteError(
                f"{r.path}: tensor {key!r} holds {n} NaN/Inf value(s); "
                "drop that checkpoint, or pass --allow-nonfinite to average anyway"
            )
        r.release(key)
    raise NonFiniteError(f"tensor {key!r}: the weighted sum overflowed float32; "
                         "use --accumulate float64")
