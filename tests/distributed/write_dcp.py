"""Run under torchrun (2 ranks, gloo, 127.0.0.1): each epoch, save a DCP checkpoint of a model
whose weights are sharded over the ranks (DTensor Shard(0)), plus optimizer-like state, the
way FSDP training does. Also saves the full tensors for the test's reference."""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

out = sys.argv[1]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for epoch in (1, 2, 3):
    g = torch.Generator().manual_seed(epoch)
    full = {"layer.weight": torch.randn(6, 4, generator=g), "layer.bias": torch.randn(5, generator=g),
            "bn.num_batches_tracked": torch.tensor(epoch)}
    model = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v for k, v in full.items()}
    optim = {"state": {"layer.weight": {"exp_avg": distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)])}}}
    dcp.save({"model": model, "optim": optim}, checkpoint_id=os.path.join(out, f"step-{epoch}00"))
    if dist.get_rank() == 0:
        torch.save(full, os.path.join(out, f"full-{epoch}.pt"))
dist.barrier()
dist.destroy_process_group()
