"""Multi-process training through torchrun: DistributedDataParallel, gloo on CPU and nccl on GPU.

``torchrun --nproc-per-node N -m resnetlab train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is
a single process and everything here is a no-op. Only rank 0 writes logs, checkpoints and reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class DistributedContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def init_distributed() -> DistributedContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
    return DistributedContext(enabled=True, rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_model(model: nn.Module, ctx: DistributedContext, *, sync_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(bare_model, forward_model)``: the module whose state dict is saved, and the one batches go through."""
    if not ctx.enabled:
        return model, model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
