"""State-dict keys: wrapper prefixes stripped once over every key (`strip_keys`), the
entries training checkpoints keep their weights under, AveragedModel's extra count, and
tensors that share storage (`find_ties`)."""

from __future__ import annotations

try:
    import resource
except ImportError:  # not a Unix
    resource = None

from typing import TYPE_CHECKING

from ckptavg.errors import CheckpointError

if TYPE_CHECKING:
    import torch


# Where training checkpoints keep the model's weights, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")


# Wrapper prefixes added by DataParallel/DDP (module.) and torch.compile (_orig_mod.).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_keys(raw: list[str], strip_prefix: str | None, path: str) -> tuple[dict[str, str], list[str]]:
    """(public name -> raw name, prefixes removed). Wrapper prefixes go when every key
    carries them; `strip_prefix` goes where present, and wrappers under it go too."""
    names = list(raw)
    removed: list[str] = []

    def unwrap() -> None:
        changed = True
        while changed and names:
            changed = False
            for p in WRAPPER_PREFIXES:
                if all(n.startswith(p) for n in names):
                    names[:] = [n[len(p):] for n in names]
                    removed.append(p)
                    changed = True

    unwrap()
    if strip_prefix and strip_prefix in removed and not any(
            n.startswith(strip_prefix) for n in names):
        strip_prefix = None  # a wrapper prefix (DDP's module.) already stripped: asked for twice
    if strip_prefix:
        if not any(n.startswith(strip_prefix) for n in names):
            raise CheckpointError(
                f"{path}: no key starts with the prefix {strip_prefix!r} to strip "
                f"(first keys: {', '.join(names[:3])}); check the prefix"
            )
        names[:] = [n[len(strip_prefix):] if n.startswith(strip_prefix) else n for n in names]
        removed.append(strip_prefix)
        unwrap()
    mapping: dict[str, str] = {}
    for public, original in zip(names, raw):
        if public in mapping:
            raise CheckpointError(
                f"{path}: keys {mapping[public]!r} and {original!r} both become {public!r} "
                "after stripping prefixes; strip a longer prefix"
            )
        mapping[public] = original
    return mapping, removed


AVERAGED_COUNT = "n_averaged"


def is_averaged_model(raw: list[str]) -> bool:
    """`torch.optim.swa_utils.AveragedModel(...).state_dict()`: `module.*` plus `n_averaged`,
    the number of models averaged (a count, not a weight)."""
    return AVERAGED_COUNT in raw and len(raw) > 1 and all(
        k.startswith("module.") for k in raw if k != AVERAGED_COUNT)


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """Equal for two names of one tensor (same storage, offset, shape, strides, dtype);
    None for empty tensors, which share nothing. A tensor a file describes (pt.TensorRef)
    gives its own."""
    if hasattr(t, "identity"):
        return t.identity()
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype)


def find_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first earlier name that is the same tensor."""
    seen: dict[tuple, str] = {}
    ties = {}
    for name, t in tensors.items():
        ident = tensor_identity(t)
        if ident is None:
            continue
        if ident in seen:
            ties[name] = seen[ident]
        else:
            seen[ident] = name
    return ties
