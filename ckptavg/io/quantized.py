"""Quantized checkpoints, told by their config or their tensor layout (issue #36).

A quantized checkpoint stores codes and the scales that give them meaning. Averaging the
codes and the scales apart (or keeping the newest input's integer codes beside averaged
scales, as the rule for integer tensors would) gives a model that loads and is wrong. Until
ckptavg averages such files in what their weights mean, every one it recognises is refused in
one line naming the scheme and the fix.

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

    from ckptavg.io.base import MAX_SIDE_FILE, Folder

    folder = reader.folder or Folder(reader.path if os.path.isdir(reader.path) else
                                     os.path.dirname(reader.path) or ".")
    scheme = from_config(folder.side_file("config.json", MAX_SIDE_FILE))
    if scheme is not None:
        return scheme, "its config.json's quantization_config"
    found = from_layout({k: reader.info(k).dtype.name for k in reader.keys()})
    return None if found is None else (found[0], f"tensor {found[1]!r}")
