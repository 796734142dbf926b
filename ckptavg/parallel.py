"""torch.distributed for ckptavg: the process group of one run and the world size.

torch is imported only when a group is first used, so a single-process `average` of
safetensors files never imports it. Shared by the engine (a torchrun average) and by nn
(data-parallel BatchNorm and evaluation).
"""

from __future__ import annotations

import os
import sys

from ckptavg.errors import CkptavgError
from ckptavg.lazy import import_torch


class _Dist:
    """torch.distributed, imported (with torch) when a group is first used."""

    def __getattr__(self, name: str):
        import_torch()
        import torch.distributed

        return getattr(torch.distributed, name)


dist = _Dist()


def world_size() -> int:
    """The number of ranks this process runs among (torchrun's WORLD_SIZE), 1 if none."""
    loaded = sys.modules.get("torch.distributed")  # a group needs torch imported already
    if loaded is not None and loaded.is_available() and loaded.is_initialized():
        return loaded.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Group:
    """The process group for one run: joined if torchrun started us and nobody else has."""

    def __enter__(self):
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.owned and dist.is_initialized():
            if exc_type is None:
                dist.barrier()  # every rank done with its collectives before teardown
            dist.destroy_process_group()

    def agree(self, error: BaseException | None, what: str = "") -> list:
        """All ranks exchange (error or None, payload); if any rank failed, every rank raises
        the first failure (a CkptavgError keeps its message; a bug names the rank)."""
        mine = (None if error is None else (type(error).__name__, str(error),
                                            isinstance(error, CkptavgError),
                                            getattr(error, "exit_code", 1)), what)
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, mine)
        for rank, (failure, _) in enumerate(gathered):
            if failure is not None:
                if error is not None and rank == self.rank and not failure[2]:
                    raise error  # a bug on this rank: its own traceback
                name, message, user, code = failure
                agreed = CkptavgError(message if user else f"rank {rank} failed: {name}: {message}")
                agreed.exit_code = code if user else 1  # a usage error stays one (exit 2)
                raise agreed
        return [payload for _, payload in gathered]

    def on_rank0(self, make, share: bool = True):
        """Rank 0 runs `make()` while the others wait; a failure there stops every rank with
        its line. Returns rank 0's value on every rank (`share`), else on rank 0 only (None
        elsewhere)."""
        made, error = None, None
        try:
            if self.rank == 0:
                made = make()
        except BaseException as e:
            error = e
        self.agree(error)
        return self.share(made) if share else made

    def share(self, value):
        """Rank 0's value, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
