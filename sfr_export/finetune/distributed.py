"""Data-parallel training on ``torch.distributed``, launched by ``torchrun`` or ``accelerate launch``.

No launcher of our own: both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, and ``init_from_env`` joins the process group they describe (NCCL on CUDA, gloo on CPU). The model
is wrapped in DDP (or FSDP when asked); contrastive in-batch negatives are all-gathered with gradients so that each
process's embeddings receive the gradient of every process's loss.

    torchrun --nproc-per-node 8 -m sfr_export.cli finetune --config ft.toml
    accelerate launch --num_processes 8 -m sfr_export.cli finetune --config ft.toml
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env() -> DistInfo:
    """Join the process group described by the launcher's environment; a single process without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        log.info("joining process group: rank %d of %d (%s)", rank, world, backend)
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(world=world, rank=rank, local_rank=local_rank, device=device)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every process's gradient and returns this process's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process (rank order); gradients flow back to each local shard.

    Every process must pass the same number of rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    if len({int(s.item()) for s in sizes}) != 1:
        raise TrainingError(f"all_gather_with_grad needs equal shards, got sizes {[int(s.item()) for s in sizes]}")
    return _GatherWithGrad.apply(x)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world


def wrap_model(model: torch.nn.Module, info: DistInfo, *, fsdp: bool = False) -> torch.nn.Module:
    """DDP (or FSDP) around ``model`` when running under a launcher; the model itself otherwise."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, use_orig_params=True,
                                        device_id=torch.device(info.device) if info.device.startswith("cuda") else None)
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def full_params(model: torch.nn.Module):
    """Context in which an FSDP model's parameters are whole on every rank (collective); a no-op otherwise."""
    import contextlib

    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def shard(rows: list[Any], info: DistInfo) -> list[Any]:
    """This process's contiguous slice of the global batch (rank-major, matching ``loss.build_layout``)."""
    if len(rows) % info.world:
        raise TrainingError(f"global batch of {len(rows)} does not split over {info.world} processes: "
                            "make sampler.batch_size a multiple of the number of processes")
    b = len(rows) // info.world
    return rows[info.rank * b:(info.rank + 1) * b]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
