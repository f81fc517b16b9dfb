"""Data-parallel training across processes (``torchrun``): process-group setup and the few collectives we use.

Under ``torchrun --nproc_per_node N`` every process runs the same ``lorakit train``; ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` come from the environment. The model is wrapped in PyTorch's
``DistributedDataParallel``, which all-reduces (averages) the trainable parameters' gradients — here only
the adapter's, a few MB — during the last micro-batch's backward pass. The backend is ``nccl`` on CUDA and
``gloo`` on CPU. Only rank 0 writes files and prints; the others wait at barriers. With ``--fsdp`` the model is
sharded instead (:mod:`lorakit.training.fsdp`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits: ``rank`` of ``size`` processes, and its device."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1), and pick the device.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, or ``"cuda:N"``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if size > 1 else 0)
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; bound for a GPU, each tensor is pinned first so the copy runs asynchronously."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def teardown(world: World, synchronize: bool = False) -> None:
    """Leave the process group; with ``synchronize`` (a run that ended cleanly on every process) first wait for
    all, so that no process tears its connections down while another still uses them."""
    if world.distributed and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sum of small float lists over all processes (loss sums, token counts)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(world: World, obj: object) -> list[object]:
    """Every process's ``obj`` (in rank order); a one-item list when not distributed."""
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj: object) -> object:
    """Rank 0's ``obj`` on every process."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
