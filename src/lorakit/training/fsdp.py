"""Fully sharded data parallel training (``torchrun ... lorakit train --fsdp``) with PyTorch's FSDP2 ``fully_shard``.

FSDP (Zhao et al. 2023, arXiv 2304.11277, §3) keeps 1/N of every parameter on each of N processes: here each
parameter becomes a ``DTensor`` sharded on dim 0. Before a *unit* runs forward (and again in backward) its
shards are all-gathered into full parameters, which are freed afterwards; gradients are reduce-scattered, so
each process ends with the gradient of its own shard, averaged over processes as DDP's all-reduce averages
(the trainer's loss scaling by ``world_size`` therefore serves both). The optimizer steps the shards.

**The plan** (:func:`shard`): each transformer block (the model's ``_no_split_modules`` classes, the unit
accelerate's transformer wrap policy picks too) is a unit; the base model is the root unit (embeddings, final
norm, output head, tied or not). A block's frozen base weights and trainable adapters share its unit:
FSDP2 all-gathers parameters of mixed dtypes through one byte buffer (a bf16 base, fp32 adapters), and
reduce-scatters only the gradients of trainable parameters, which must share one dtype (fp32 adapters do).
Trainable parameters outside the base model (a prompt encoder) would escape sharding and gradient
averaging, so :func:`check_supported` refuses them.

**Saves gather the adapter only** (:func:`whole_adapters`, :class:`GatheredOptimizer`): every process calls
``full_tensor()`` on each adapter DTensor (and on its AdamW moments), in the same order; rank 0 writes the
usual files with ``save_pretrained``, so a checkpoint of an FSDP run is the checkpoint a single process writes
(same keys, full shapes), and the final adapter is PEFT's format. The frozen base is never gathered whole.
Resuming reads the full tensors on every process and keeps each its own shard (:func:`place_like`:
``distribute_tensor`` with ``src_data_rank=None``, no communication).

**DoRA**: FSDP2 refills a unit's unsharded parameters in place without moving their version counters, so a
cache keyed on them would keep last step's ‖W + s·BA‖; :func:`shard` turns DoRA's norm cache off (the norm is
then recomputed each forward, as PEFT always does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.sharding import dtensor_cls as _dtensor_cls
from lorakit.sharding import full
from lorakit.sharding import whole_adapters as whole_adapters  # the trainer and its tests use it from here
from lorakit.training.distributed import World
from lorakit.tuners.lora.dora import DoraMagnitude


def check_world(world: World) -> None:
    """Raises ConfigError for one process: there is nothing to shard across."""
    if world.size < 2:
        raise ConfigError(
            "--fsdp shards the model across processes; launch it with torchrun --nproc_per_node N (N >= 2). "
            "This run has 1 process"
        )


def check_supported(model: Any) -> None:
    """Refuse a model whose trainable parameters this plan would not shard.

    Raises:
        ConfigError: a trainable parameter outside the base model (a prompt encoder), which would be neither
            sharded nor averaged.
    """
    inside = {id(p) for p in model.get_base_model().parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise ConfigError(
            f"--fsdp shards the base model and the adapters inside it; this method trains {len(outside)} parameters "
            f"outside it (first {outside[0]!r}), which would be neither sharded nor averaged. Use DDP (drop --fsdp)"
        )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes in ``_no_split_modules`` (transformers' list of blocks
    that must stay whole), else the entries of its longest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(model: Any, world: World) -> list[str]:
    """Apply ``fully_shard`` to each transformer block, then to the base model (the root); returns the units'
    module names (``""`` for the root), blocks first. Call before the optimizer is built (it swaps parameters
    for DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_supported(model)
    base = model.get_base_model()
    mesh = init_device_mesh(world.device.type, (world.size,))
    names = {id(m): n for n, m in base.named_modules()}
    units = []
    for block in transformer_blocks(base):
        fully_shard(block, mesh=mesh)
        units.append(names[id(block)])
    fully_shard(base, mesh=mesh)
    units.append("")
    for module in model.modules():
        if isinstance(module, DoraMagnitude):
            module.cache_norm = False
    return units


@contextlib.contextmanager
def no_sync(model: Any) -> Iterator[None]:
    """Accumulate gradients without reduce-scattering them (micro-batches before the last of a step)."""
    root = model.get_base_model()
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, _dtensor_cls()) else tensor


def place_like(live: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) sharded as ``live`` is; no communication."""
    if not isinstance(live, _dtensor_cls()):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=live.device, dtype=live.dtype)
    return distribute_tensor(value, live.device_mesh, live.placements, src_data_rank=None)


class GatheredOptimizer:
    """An optimizer's ``state_dict()`` with every DTensor state replaced by the whole tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        """Gathers at once: a collective, every process must build one."""
        state = optimizer.state_dict()
        whole = {
            index: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            for index, entry in state["state"].items()
        }
        self._state = {**state, "state": whole}

    def state_dict(self) -> dict[str, Any]:
        return self._state
