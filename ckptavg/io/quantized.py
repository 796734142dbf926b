"""Quantized checkpoints, told by their config or their tensor layout (issue #36).

A quantized checkpoint stores codes and the scales that give them meaning. Averaging the
codes and the scales apart (or keeping the newest input's integer codes beside averaged
scales, as the rule for integer tensors would) gives a model that loads and is wrong.

FP8 with scales (`fp8_layout`: per-tensor, per-channel and block scales, as compressed-tensors
and DeepSeek-V3 ship them) and MXFP4 (OCP microscaling: 32 FP4 e2m1 values, two a byte, in
`*_blocks` beside one e8m0 exponent each in `*_scales`, as gpt-oss ships its experts) are
averaged in the weights' own space by engine/fp8.py. Every other scheme recognised here is
refused in one line naming the scheme and the fix.

Recognised from a Hugging Face `config.json` beside the input (`quantization_config`'s
`quant_method`), and from the tensors themselves for files without one:

- a float8 tensor beside a `*_scale`, `*_scale_inv`, `*.weight_scale` or `*.weight_scale_inv`
  (FP8 as DeepSeek-V3 ships it, compressed-tensors' FP8);
- `*.qweight` / `*.qzeros` (GPTQ, AWQ);
- `*.absmax`, `*.quant_map`, `*.quant_state.*` (bitsandbytes);
- `*_blocks` beside `*_scales` (MXFP4, as gpt-oss ships it);
- any integer tensor beside a `*scale*` tensor of the same module (a scheme not named here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ckptavg.errors import CkptavgError

FLOAT8 = {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
SCALE_SUFFIXES = ("_scale", "_scale_inv")
# packed codes; int64 is left out: models keep int64 index buffers beside float scales
# (Swin V2's relative_position_index beside its logit_scale)
INTEGERS = {"int8", "uint8", "int16", "int32", "uint16", "uint32", "int4", "uint4"}


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def from_config(config: bytes | None) -> str | None:
    """The scheme a `config.json` declares (`quantization_config.quant_method`), if any."""
    if not config:
        return None
    try:
        cfg = json.loads(config)
    except (ValueError, RecursionError):
        return None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method") or q.get("quantization_method") or "unnamed"
    return str(method)


def from_layout(dtypes: dict[str, str]) -> tuple[str, str] | None:
    """(scheme, an example key) of a quantized layout among `dtypes` (name -> dtype name),
    else None."""
    keys = set(dtypes)
    for k, dt in dtypes.items():
        if dt in FLOAT8:
            stem = k[: -len(".weight")] if k.endswith(".weight") else k
            for sib in (f"{k}{s}" for s in SCALE_SUFFIXES):
                if sib in keys:
                    return "fp8 (codes with scales)", k
            for sib in (f"{stem}.weight_scale", f"{stem}.weight_scale_inv"):
                if sib in keys:
                    return "fp8 (codes with scales)", k
    for k in keys:
        last = k.rsplit(".", 1)[-1]
        if last in ("qweight", "qzeros", "g_idx") and (last != "g_idx" or
                                                        f"{_module(k)}.qweight" in keys):
            return "gptq/awq (packed integer codes)", k
        if last in ("absmax", "quant_map") or ".quant_state." in k or k.endswith(".quant_state"):
            return "bitsandbytes", k
        if k.endswith("_blocks") and f"{k[: -len('_blocks')]}_scales" in keys:
            return "mxfp4 (blocks with scales)", k
    scaled = {_module(k) for k in keys if "scale" in k.rsplit(".", 1)[-1]}
    for k, dt in dtypes.items():
        if _module(k) in scaled and "scale" not in k.rsplit(".", 1)[-1] and dt in INTEGERS:
            return "integer codes beside a scale (an unknown scheme)", k
    return None



def scheme_of(reader) -> tuple[str, str] | None:
    """(scheme, where it was seen) of a quantized input (an open reader), else None: its
    folder's config.json first, then its tensors."""
    import os

    from ckptavg.io.folders import MAX_SIDE_FILE, Folder

    folder = reader.folder or Folder(reader.path if os.path.isdir(reader.path) else
                                     os.path.dirname(reader.path) or ".")
    scheme = from_config(folder.side_file("config.json", MAX_SIDE_FILE))
    if scheme is not None:
        return scheme, "its config.json's quantization_config"
    found = from_layout({k: reader.info(k).dtype.name for k in reader.keys()})
    return None if found is None else (found[0], f"tensor {found[1]!r}")


# The methods a config names for FP8 weights (the tensors must then be FP8 with scales),
# and for MXFP4 (the tensors: `*_blocks` with `*_scales`).
FP8_METHODS = {"fp8", "compressed-tensors", "fbgemm_fp8", "finegrained_fp8"}
MX_METHODS = {"mxfp4"}
MX_BLOCK = 32  # values per MXFP4 block (one e8m0 scale each), 16 bytes of codes
# Scales of activations (static input quantization, the KV cache): statistics, not weights.
ACTIVATION_SCALES = ("input_scale", "output_scale", "k_scale", "v_scale", "q_scale")
BLOCKS = (128, 64, 32, 256)  # block sizes recognised from the scale's shape (DeepSeek: 128)


@dataclass(frozen=True)
class Fp8Pair:
    """An FP8 weight and its scale: value = code * scale, with the scale per tensor (one
    number), per output channel (one per row) or per block of `block` rows x columns."""

    weight: str
    scale: str
    kind: str  # "tensor", "channel" or "block"; "mx": MXFP4 blocks and their exponents
    block: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Fp8Layout:
    """The FP8 pairs of a checkpoint and its activation scales (by key)."""

    pairs: dict[str, Fp8Pair]  # weight key -> its pair
    activations: tuple[str, ...]

    @property
    def scales(self) -> dict[str, str]:
        """scale key -> its weight key."""
        return {p.scale: p.weight for p in self.pairs.values()}

    @property
    def mx(self) -> bool:
        """Whether any pair is MXFP4 (`kind` "mx")."""
        return any(p.kind == "mx" for p in self.pairs.values())

    @property
    def families(self) -> set[str]:
        """"fp8" and/or "mxfp4": the schemes whose tensors are here."""
        return {"mxfp4" if p.kind == "mx" else "fp8" for p in self.pairs.values()}

    def describe(self) -> str:
        kinds = sorted({p.kind if p.kind != "block" else f"{p.block[0]}x{p.block[1]} block"
                        for p in self.pairs.values() if p.kind != "mx"})
        parts = [f"fp8 ({', '.join(kinds)} scales)"] if kinds else []
        if self.mx:
            parts.append(f"mxfp4 ({MX_BLOCK}-value blocks, e8m0 scales)")
        return " and ".join(parts)


def _scale_of(key: str, keys: set[str]) -> str | None:
    stem = key[: -len(".weight")] if key.endswith(".weight") else None
    names = [f"{key}{s}" for s in SCALE_SUFFIXES]
    if stem is not None:
        names += [f"{stem}.weight_scale", f"{stem}.weight_scale_inv"]
    return next((n for n in names if n in keys), None)


def _kind(shape: tuple, scale_shape: tuple) -> tuple[str, tuple[int, int]] | None:
    numel = math.prod(scale_shape)
    if numel == 1:
        return "tensor", (1, 1)
    if len(shape) != 2:
        return None
    out, inp = shape
    if tuple(scale_shape) in ((out,), (out, 1)):
        return "channel", (1, inp)
    if len(scale_shape) == 2:
        for b in BLOCKS:
            if scale_shape == (-(-out // b), -(-inp // b)):
                return "block", (b, b)
    return None


def fp8_layout(path: str, infos: dict) -> Fp8Layout | None:
    """The FP8 and MXFP4 layout of a checkpoint whose tensors are `infos` (key ->
    TensorInfo), or None where no float8 tensor has a scale and no MXFP4 blocks are found.
    A float8 tensor without a scale, or a scale whose shape is no per-tensor, per-channel or
    block layout, or MXFP4 blocks of another shape, are refused in one line."""
    dtypes = {k: i.dtype.name for k, i in infos.items()}
    keys = set(infos)
    pairs = {}
    for k, dt in dtypes.items():
        if dt not in FLOAT8:
            continue
        scale = _scale_of(k, keys)
        if scale is None:
            continue
        found = _kind(tuple(infos[k].shape), tuple(infos[scale].shape))
        if found is None or not infos[scale].dtype.is_floating_point or dtypes[scale] in FLOAT8:
            raise CkptavgError(
                f"{path}: tensor {k!r} is FP8 with a scale {scale!r} of shape "
                f"{list(infos[scale].shape)} ({dtypes[scale]}), which is no per-tensor, "
                "per-channel or block scale ckptavg knows; it is refused rather than "
                "averaged as codes: dequantize the checkpoints first")
        pairs[k] = Fp8Pair(k, scale, *found)
    pairs.update(_mx_pairs(path, infos))
    if not pairs:
        return None
    bare = [k for k, dt in dtypes.items() if dt in FLOAT8 and k not in pairs]
    if bare:
        raise CkptavgError(f"{path}: tensor {bare[0]!r} is FP8 without a scale beside it, "
                           "so what its codes mean is not known; it is refused rather than "
                           "averaged as codes: dequantize the checkpoints first")
    paired = {p.scale for p in pairs.values()}
    activations = tuple(k for k in infos if k not in paired and k.rsplit(".", 1)[-1]
                        in ACTIVATION_SCALES)
    return Fp8Layout(pairs, activations)


def _family(scheme: str) -> str | None:
    """"fp8" or "mxfp4" for a scheme named by a config or found in the tensors, else None."""
    if scheme in MX_METHODS or scheme.startswith("mxfp4 ("):
        return "mxfp4"
    if scheme in FP8_METHODS or scheme.startswith("fp8 ("):
        return "fp8"
    return None


def _mx_pairs(path: str, infos: dict) -> dict[str, Fp8Pair]:
    """The MXFP4 pairs among `infos`: `X_blocks` (uint8, [..., G, 16]: 32 FP4 codes a row)
    beside `X_scales` (uint8, [..., G]: each row's e8m0 exponent). Any other shape or dtype
    is refused in one line rather than averaged as codes."""
    pairs = {}
    for k, info in infos.items():
        if not k.endswith("_blocks") or f"{k[: -len('_blocks')]}_scales" not in infos:
            continue
        scale = f"{k[: -len('_blocks')]}_scales"
        shape, sshape = tuple(info.shape), tuple(infos[scale].shape)
        if (info.dtype.name != "uint8" or infos[scale].dtype.name != "uint8" or not shape
                or shape[-1] != MX_BLOCK // 2 or sshape != shape[:-1]):
            raise CkptavgError(
                f"{path}: {k!r} ({info.dtype.name}, {list(shape)}) beside {scale!r} "
                f"({infos[scale].dtype.name}, {list(sshape)}) is no mxfp4 layout ckptavg knows "
                "(uint8 blocks [..., G, 16] and uint8 scales [..., G]); it is refused rather "
                "than averaged as codes: dequantize the checkpoints first")
        pairs[k] = Fp8Pair(k, scale, "mx", (1, MX_BLOCK))
    return pairs


def without_quantization(config: bytes) -> bytes:
    """A `config.json` without its `quantization_config`: the config of an FP8 average
    written in high precision (`--dtype`), which loads as an unquantized model."""
    try:
        cfg = json.loads(config)
    except (ValueError, RecursionError):
        return config
    if not isinstance(cfg, dict) or "quantization_config" not in cfg:
        return config
    cfg.pop("quantization_config")
    return (json.dumps(cfg, indent=2) + "\n").encode()


def quantized_layout(readers) -> Fp8Layout | None:
    """The FP8 and MXFP4 layout of the inputs (io/quantized.Fp8Layout), averaged in the
    weights' own space by engine/fp8.py; None for unquantized inputs. Any other quantized input is one
    line (io/quantized.py): its codes would be averaged apart from their scales, or kept
    beside averaged ones, giving a model that loads and is wrong."""
    ref = readers[0]
    layout = fp8_layout(ref.path, {k: ref.info(k) for k in ref.keys()})
    for r in readers:
        found = scheme_of(r)
        if layout is not None and found is not None and _family(found[0]) in layout.families:
            rest = {k: r.info(k).dtype.name for k in r.keys()
                    if k not in layout.pairs and k not in layout.scales}
            found = from_layout(rest)  # FP8 weights beside another scheme's codes
            found = None if found is None else (found[0], f"tensor {found[1]!r}")
        if found is not None:
            raise CkptavgError(
                f"{r.path}: a quantized checkpoint ({found[0]}, from {found[1]}); averaging "
                "its codes apart from their scales would give a wrong model, so it is "
                "refused: average the unquantized checkpoints, or dequantize each one first")
    return layout
