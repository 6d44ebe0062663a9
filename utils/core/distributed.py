"""Data-parallel burn-in under ``torchrun`` (SPEC "Phase 1"): one process per device, each on a shard of every
global batch, gradients averaged by DistributedDataParallel; one process (``Dist.single()``) without torchrun.

Every rank draws the same global batch (the same seeded order and augmentation, so the random draws match the
single-process run) and keeps its rows; the loss is scaled so that the averaged gradient is the gradient of the
global batch's mean loss, whatever the shards' sizes.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn

from utils.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: its rank, the number of ranks, its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> Dist:
    """Join the torchrun job (nccl on CUDA, one GPU per local rank; gloo on CPU), or a single process."""
    if not launched_by_torchrun():
        return Dist(0, 1, device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise UserError(f"torchrun started {world} processes but this machine has {torch.cuda.device_count()} "
                            f"GPU(s) for local rank {local}; use --nproc_per_node {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, device)


def teardown(dist: Dist) -> None:
    """Leave the torchrun job: free what still holds the process group (a DDP model), then destroy it, so that no
    gloo thread is left to the interpreter's exit (it aborts the process there)."""
    if dist.on and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """The model as DDP trains it: BatchNorm synchronised across ranks on CUDA (the global batch's statistics,
    as one process has them); on the CPU (gloo) each rank normalises its own shard: a documented difference."""
    if not dist.on:
        return model
    if dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.index is not None
                                               else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (what checkpoints hold)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(x: torch.Tensor, y: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch (contiguous, sizes differing by at most one)."""
    if not dist.on:
        return x, y
    return x.tensor_split(dist.world)[dist.rank], y.tensor_split(dist.world)[dist.rank]


def all_sum(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The sum of a tensor over ranks (the tensor itself in one process)."""
    if dist.on:
        value = value.clone()
        tdist.all_reduce(value)
    return value


def agree(ok: bool, dist: Dist, what: str) -> None:
    """All ranks go on only if every rank got this far (a failing rank 0 must not leave the others waiting)."""
    if dist.on:
        flag = torch.tensor([1 if ok else 0], device=dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        if not flag.item() and ok:
            raise UserError(f"another rank failed {what}; its message says why")


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not dist.on:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
