"""Which torch device a command runs on."""

from __future__ import annotations

import os

import torch

from ckptavg.errors import OptionError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` is the first CUDA GPU when there is one, else the CPU. Under torchrun,
    `"auto"` and `"cuda"` mean the GPU of this local rank (LOCAL_RANK modulo the GPUs seen).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", "no CUDA GPU is available here; use cpu or auto", repr(device))
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        try:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        except ValueError:
            pass
    try:
        return torch.device(device)
    except RuntimeError:
        raise OptionError("device", "use auto, cpu or cuda[:N]", repr(device)) from None
