"""`average` across torch.distributed ranks: `torchrun ... -m ckptavg average INPUTS -o DIR`.

Every rank selects and plans the same run (same inputs, same order, same weights), then
streams only its share of the tensor names, balanced by bytes, from every input, and writes
its own safetensors shard into the output's staging folder, through the same writer and the
same `write_run` as one process (io/writer.ShardedWriter with the group). The ranks exchange
their shards' records; rank 0 writes the index (and the inputs' config files) and swaps the
folder in (a DCP output: one collective save from the staged shards). No tensor crosses
the network; the inputs must be on a filesystem every rank sees. Each tensor is reduced by
the same code as in one process, so the result is bitwise the same. A problem found by any rank is shared with all of them at the next agreement
point, so every rank stops with the same one-line error instead of hanging, and nothing is
left at the output.
"""

from __future__ import annotations

import contextlib

from ckptavg.engine.plan import Request
from ckptavg.engine.prepare import choose, plan_run
from ckptavg.engine.result import AverageResult
from ckptavg.engine.write import write_run
from ckptavg.parallel import Group


def average_ranks(group: Group, req: Request, progress=None) -> AverageResult:
    """`average` on one of several ranks: the same selection and plan everywhere, then this
    rank's share of the tensors into its shard of the folder (`write_run` with the group:
    io/writer.ShardedWriter shares the tensors out and rank 0 commits). Failures are agreed
    on, never hung on."""
    with contextlib.ExitStack() as stack:
        error, plan, result, run = None, None, None, None
        try:  # the same preparation as one process's (engine/prepare.py), on every rank
            run = choose(req, stack)
            plan, result = plan_run(req, run)
        except BaseException as e:
            error = e
        group.agree(error)
        if not req.dry_run:
            write_run(req, plan, run, result, progress, group)
        result.ranks, result.rank = group.size, group.rank
        return result
