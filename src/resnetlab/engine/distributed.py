"""Multi-process training through torchrun: DistributedDataParallel, gloo on CPU and nccl on GPU.

``torchrun --nproc-per-node N -m resnetlab train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is
a single process and everything here is a no-op. Only rank 0 writes logs, checkpoints and reports, and only rank 0
validates: it broadcasts the results, so that every rank takes the same early-stopping, best-checkpoint and
learning-rate decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from resnetlab.errors import ConfigError


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

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; for small records and checkpoint dicts)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a stop decision all ranks must share)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def _device(self) -> torch.device:
        # nccl reduces CUDA tensors only; gloo CPU tensors
        if torch_dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group torchrun set up (nccl when the run uses GPUs, gloo on CPU); a no-op without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            torch_dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            torch_dist.init_process_group(backend="gloo")
    return DistributedContext(enabled=True, rank=rank, world_size=world_size, local_rank=local_rank)


def wrap_model(model: nn.Module, ctx: DistributedContext, *, sync_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """``(bare_model, forward_model)``: the module whose state dict is saved, and the one batches go through."""
    if not ctx.enabled:
        return model, model
    is_cuda = next(model.parameters()).is_cuda
    if sync_bn:
        if not is_cuda:
            raise ConfigError("train.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernels); "
                              "set train.sync_bn=false for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ctx.local_rank] if is_cuda else None
    return model, nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
