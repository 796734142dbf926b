"""The plan of an averaging run: everything it will do, fixed before any tensor is read.

`make_plan` checks that the inputs agree (keys, shapes, dtypes) and fixes the weights, the
output tensor specs, ties, metadata and bytes: what a dry run reports and what `execute`
(kernel.py) carries out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptavg import options
from ckptavg.engine import profiles
from ckptavg.engine.content import placeholder
from ckptavg.engine.select import Candidate, require_order
from ckptavg.errors import CkptavgError, MismatchError, OptionError
from ckptavg.io import ReaderBase, SourceFile, TensorSpec, dtypes
from ckptavg.io.checkpoint import weights_entry
from ckptavg.io.quantized import quantized_layout
from ckptavg.options import Accumulate, Method, OutDtype, Reading, Selection, check_choice
from ckptavg.version import __version__

OUT_DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16,
              "float64": dtypes.float64}


SHOWN = 3  # problems listed per file in a mismatch error


@dataclass(frozen=True)
class Request:
    """What `average` was asked, checked and resolved (`average._checked`: the profile
    parsed, the output's kind and the method known): the same on every torchrun rank."""

    inputs: tuple[str, ...]
    output: str | None
    kind: str | None  # output_kind: "file", "sharded", "torch", "dcp"...
    method: Method
    weights: tuple[float, ...] | None
    ema: float | None
    profile: profiles.Profile | str | None  # a spec until checked
    selection: Selection
    reading: Reading
    accumulate: Accumulate
    dtype: OutDtype | None
    allow_nonfinite: bool
    hash_inputs: bool
    dry_run: bool
    threads: int | None
    resume: bool = False
    into: str | None = None  # a running average to fold into (one process)
    shard_size: int | None = None
    dcp: bool = False
    sweep: str | None = None  # "window=W[,stride=S]": one average per window (sweep.py)

    @property
    def spec(self) -> str | None:
        """The profile as parsed: what metadata records."""
        return self.profile.spec if self.profile is not None else None


@dataclass
class Plan:
    """Everything a run will do, fixed before any tensor is read."""

    readers: list[ReaderBase]
    weights: list[float]  # raw weights; the average divides by their sum
    specs: list[TensorSpec]  # output specs, in output order
    ties: dict[str, str]
    metadata: dict[str, str]
    accumulate: Accumulate = "float64"
    allow_nonfinite: bool = False
    entry: str | None = "state_dict"  # where a torch output keeps the weights: the newest input's (None: bare)
    extras: dict = field(default_factory=dict)  # the newest input's carried configuration
    fp8: Any = None  # io.quantized.Fp8Layout of FP8 inputs, averaged by engine/fp8.py
    dequantize: bool = False  # FP8 weights written in the output dtype, without scales

    @property
    def total_weight(self) -> float:
        return sum(self.weights)

    @property
    def bytes_in(self) -> int:
        """Bytes read: every input's floating tensors, and the newest input's others."""
        last = self.readers[-1]
        return sum(r.info(s.key).nbytes for r in self.readers for s in self.specs
                   if r is last or r.info(s.key).dtype.is_floating_point)

    @property
    def read_specs(self) -> list[TensorSpec]:
        """The inputs' tensors, as they are (the content hashes cover them all): the output
        specs with the inputs' dtypes, plus the FP8 scales a dequantized output leaves out."""
        ref = self.readers[0]
        keys = [s.key for s in self.specs]
        if self.dequantize:
            written = set(keys)
            keys += [k for k in ref.keys() if k not in written]
        return [TensorSpec(k, ref.info(k).shape, ref.info(k).dtype) for k in keys]

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.specs)


def _scales_after_weights(specs: list[TensorSpec], scales: dict[str, str]) -> list[TensorSpec]:
    """`specs` with each FP8 weight's scale right after the weight: the scales of rows and
    blocks are made as the weight's rows pass, in one read, and written next (safetensors
    files put every float32 scale before the one-byte codes, which would otherwise mean a
    second read or holding the codes)."""
    by_weight = {w: sc for sc, w in scales.items()}
    spec_of = {s.key: s for s in specs}
    out = []
    for s in specs:
        if s.key in scales:
            continue
        out.append(s)
        if s.key in by_weight and by_weight[s.key] in spec_of:
            out.append(spec_of[by_weight[s.key]])
    return out


def sha256_of(files: list[SourceFile]) -> str:
    """sha256 of the files an input consists of, refusing a file changed since it was opened."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        if f.changed():
            raise CkptavgError(f"{f.path}: changed since it was opened; run again")
        with f.reader() as read:
            for off in range(0, f.size, 1 << 22):
                h.update(read(min(1 << 22, f.size - off), off))
    return h.hexdigest()


def method_weights(n: int, method: Method, weights: Sequence[float] | None = None,
                   decay: float | None = None) -> list[float]:
    """Normalised per-input weights, oldest first.

    Args:
        n: number of inputs.
        method: "uniform", "weighted" (uses `weights`) or "ema" (uses `decay`).
        weights: one non-negative weight per input, for "weighted" (normalised here).
        decay: the EMA decay in [0, 1), for "ema".

    Returns:
        n weights that sum to 1.

    EMA follows torch's AveragedModel: the first input starts the average and each later one
    is folded in as `avg = decay * avg + (1 - decay) * w`; the oldest input keeps
    `decay ** (n - 1)`, each later one `(1 - decay) * decay ** (n - 1 - i)`.

    Example:
        >>> method_weights(3, "ema", decay=0.5)
        [0.25, 0.25, 0.5]
    """
    if method == "uniform":
        return [1.0 / n] * n
    if method == "weighted":
        ws = [float(w) for w in weights or []]
        if len(ws) != n:
            raise OptionError("weights", f"{len(ws)} given for {n} selected inputs; give one per input")
        if any(w < 0 or not math.isfinite(w) for w in ws) or sum(ws) <= 0:
            raise OptionError("weights", "must be finite, non-negative and not all zero")
        total = sum(ws)
        return [w / total for w in ws]
    if method == "ema":
        if decay is None or not 0.0 <= decay < 1.0:
            raise OptionError("ema", "the decay must be in [0, 1)", decay)
        return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - 1 - i) for i in range(1, n)]
    raise CkptavgError(f"unknown averaging method {method!r}")


def _mismatches(readers: list[ReaderBase]) -> list[str]:
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
            if k in keys:
                a, b = ref.info(k), r.info(k)
                if a.shape != b.shape:
                    diffs.append(f"{k} {list(b.shape)} vs {list(a.shape)}")
                elif a.dtype != b.dtype:
                    diffs.append(f"{k} {b.dtype} vs {a.dtype}".replace("torch.", ""))
        if diffs:
            parts.append(f"{len(diffs)} shape/dtype difference(s) ({', '.join(diffs[:SHOWN])})")
        if parts:
            problems.append(f"{r.path}: {'; '.join(parts)}")
    return problems


def _carried_metadata(metas: list[dict[str, str]]) -> dict[str, str]:
    """model.* and data.* entries on which every input agrees."""
    return {k: v for k, v in metas[0].items()
            if k.startswith(("model.", "data.")) and all(m.get(k) == v for m in metas[1:])}


def check_options(accumulate: str, dtype: str | None) -> None:
    check_choice("accumulate", accumulate, Accumulate)
    if dtype is not None:
        check_choice("dtype", dtype, OutDtype)


def _check_quantized(layout, running: bool, dtype: OutDtype | None) -> None:
    """What quantized inputs refuse: a running average (`into`), requantized at every fold,
    would drift from the average of its inputs; MXFP4 is written as MXFP4 only."""
    if running:
        raise OptionError("into", f"folds exactly into a running average that is not "
                          f"quantized; an {'MXFP4' if layout.mx else 'FP8'} running average "
                          "would be requantized at every fold and drift from the average of "
                          "its inputs: average all the checkpoints at once instead")
    if layout.mx and dtype:
        raise OptionError("dtype", "MXFP4 inputs are averaged into MXFP4 (new blocks and "
                          "scales): their dequantized weights have the model's own layout "
                          "(gpt-oss transposes its experts), so ckptavg does not write them; "
                          "drop --dtype, or dequantize the inputs with transformers first",
                          dtype)


def make_plan(readers: list[ReaderBase], weights: list[float], *, method: str = "uniform",
              running: tuple[int, list] | None = None,
              accumulate: Accumulate = options.ACCUMULATE, dtype: OutDtype | None = None,
              allow_nonfinite: bool = False, hash_inputs: bool = False,
              profile: str | None = None, content: bool = False) -> Plan:
    """Check that the inputs agree and fix the run: specs, ties, metadata.

    `readers` and `weights` are oldest first. With `running` (n_total, prior_inputs: a
    running average's `average.inputs`), `readers[0]` is that running average and n_total
    counts its inputs and the new ones.
    Each new input's entry in `average.inputs` records its file name, fingerprint and
    identity (ReaderBase.entry); with `content`, a placeholder for its content hash,
    which the read pass computes and the writer fills in (engine/content.py).
    Raises MismatchError naming each file that differs from the first."""
    check_options(accumulate, dtype)
    problems = _mismatches(readers)
    if problems:
        raise MismatchError(
            f"inputs do not match {readers[0].path}: " + " | ".join(problems)
            + " -- average checkpoints of one architecture (and dtype), or align keys by "
            "stripping a prefix"
        )
    fp8 = quantized_layout(readers)  # io/quantized.py: FP8, MXFP4 averaged in value space
    if fp8 is not None:
        _check_quantized(fp8, running is not None, dtype)
    ref = readers[0]
    ties = dict(ref.ties())
    for r in readers[1:]:
        other = r.ties()
        ties = {k: v for k, v in ties.items() if other.get(k) == v}
    out_dtype = OUT_DTYPES.get(dtype) if dtype else None
    # FP8 with --dtype: the weights written in that dtype, without scales (dequantized);
    # else requantized, each weight beside its new scale (engine/fp8.py)
    dropped = set(fp8.scales) | set(fp8.activations) if fp8 is not None and out_dtype else set()
    specs = []
    for k in ref.keys():
        info = ref.info(k)
        if k in dropped:
            continue
        floating = info.dtype.is_floating_point
        specs.append(TensorSpec(k, info.shape, out_dtype if out_dtype and floating else info.dtype))
    if fp8 is not None and not out_dtype:
        specs = _scales_after_weights(specs, fp8.scales)
    n_total, prior_inputs = running if running is not None else (len(readers), None)
    new = readers[1:] if prior_inputs is not None else readers
    entries = [r.entry() for r in new]
    if content:
        for i, e in enumerate(entries):
            e["content"] = placeholder(i)
    if hash_inputs:
        for e, r in zip(entries, new):
            e["sha256"] = sha256_of(r.files)
    has_bn = any(s.key.endswith(("running_mean", "running_var")) for s in specs)
    metadata = {
        "ckptavg.version": __version__,
        **_carried_metadata([r.metadata() for r in readers]),
        "average.n": str(n_total),
        "average.method": method,
        "average.weights": json.dumps([1.0 / n_total] * n_total if prior_inputs is not None
                                      else [w / sum(weights) for w in weights]),
        "average.inputs": json.dumps(list(prior_inputs or []) + entries),
        "average.accumulate": accumulate,
        **({"average.profile": profile} if profile else {}),
        **({"average.quantized": f"{fp8.describe()}: each input dequantized with its own "
            "scales, averaged in float64, " + (f"written as {dtype}" if out_dtype else
                                               "requantized with new scales")}
           if fp8 is not None else {}),
        "bn.stale": "true" if has_bn else "false",
    }
    newest = readers[-1]
    entry = torch_entry(newest)
    return Plan(readers, list(weights), specs, ties, metadata, accumulate, allow_nonfinite,
                entry, newest.extras() if entry is not None else {}, fp8,
                fp8 is not None and out_dtype is not None)


def record_recipe(plan: Plan, paths: list[str], reading: Reading, output: str | None,
                  dtype: OutDtype | None, running: bool = False) -> None:
    """Put into `plan.metadata` what `verify` needs to re-derive the output from its inputs:
    each input's path relative to the output's folder (never an absolute path of this
    machine, so a tree moved whole still verifies; an object's URL as it is), where the
    weights are read from, and the weights exactly as applied (JSON keeps a float's every
    bit). A running average (`into`) has no recipe: it was folded from an earlier
    average, which a later fold replaced."""
    if running:
        return
    import os

    base = os.path.dirname(os.path.abspath(output)) if output else os.getcwd()
    plan.metadata["average.recipe"] = json.dumps({
        "inputs": [p if "://" in p else os.path.relpath(os.path.abspath(p), base)
                   for p in paths],
        "key": reading.key, "strip_prefix": reading.strip_prefix,
        "weights": list(plan.weights), "accumulate": plan.accumulate, "dtype": dtype,
        "allow_nonfinite": plan.allow_nonfinite})


def torch_entry(newest: ReaderBase) -> str | None:
    """Where a torch output keeps the weights: where the newest input kept them (None: a
    bare state dict; io.checkpoint.weights_entry)."""
    return weights_entry(newest.location, newest.other_entries)


def carried_notes(newest: ReaderBase) -> list[str]:
    """Warnings for what carrying the newest input's configuration into a torch output
    converted or left out."""
    return [f"{newest.path}: {n} (a torch output holds plain values only, so that "
            "torch.load(weights_only=True) reads it)" for n in newest.extras_notes]


def chosen_weights(chosen: list[Candidate], method: Method, weights, ema,
                    prof: profiles.Profile | None, given_order: bool = False) -> list[float]:
    """The raw weights of the chosen inputs: a profile's, from their positions, or those of
    `_raw_weights`. Weights given per input or an EMA need the inputs' order in training
    (`require_order`)."""
    if prof is None:
        if method in ("ema", "weighted"):
            require_order(chosen, ("ema" if method == "ema" else "weights",), given_order)
        return raw_weights(len(chosen), method, weights, ema)
    return profiles.weights(prof, profile_positions(chosen))


def profile_positions(chosen: list[Candidate]) -> list[int]:
    """Where each input was saved, as a profile counts: every input's tokens seen when all
    record them, else every input's step when all have one, else every input's epoch (the
    positions --dry-run shows)."""
    if all(c.tokens is not None for c in chosen):
        return [c.tokens for c in chosen]
    if all(c.step is not None for c in chosen):
        return [c.step for c in chosen]
    if all(c.epoch is not None for c in chosen):
        return [c.epoch for c in chosen]
    lacking = next(c for c in chosen if c.epoch is None)
    raise OptionError("profile", f"weights inputs by where they were saved, and {lacking.path} "
                      "has no step or epoch (no metadata, checkpoint entry or number in its "
                      "name); name the files by epoch or step, or drop the profile")


def raw_weights(n: int, method: Method, weights, ema) -> list[float]:
    """The weights the plan applies: 1 per input for a uniform mean (so --into can weight the
    running average by its count), else the normalised weights or EMA decays."""
    norm = method_weights(n, method, weights, ema)
    return list(norm) if method != "uniform" else [1.0] * n


def dcp_entry(newest: ReaderBase) -> str | None:
    """Where a DCP output keeps the weights: the newest input's entry, else the top level."""
    return newest.location if newest.location in ("state_dict", "model") else None
