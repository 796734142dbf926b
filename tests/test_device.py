"""Which device a command runs on; under torchrun each local rank takes its own GPU."""

from __future__ import annotations

import pytest
import torch

from ckptavg.errors import CkptavgError
from ckptavg.nn.device import resolve_device


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CkptavgError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("local_rank, want", [("0", 0), ("1", 1), ("3", 1)])
def test_torchrun_ranks_take_the_gpu_of_their_local_rank(monkeypatch, local_rank, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device("auto") == torch.device("cuda", want)
    assert resolve_device("cuda") == torch.device("cuda", want)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # named: as given


def test_one_process_auto_is_the_first_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
