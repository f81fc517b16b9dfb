"""Whole adapter tensors from a sharded model (FSDP2's ``DTensor`` parameters), for saving.

A model sharded with PyTorch's ``fully_shard`` (by ``lorakit train --fsdp`` or by accelerate under the HF Trainer)
holds each parameter as a ``DTensor``: 1/N of it on each of N processes. An adapter save needs the whole tensors,
so every process gathers them (``full_tensor()``, a collective, in the same order everywhere) and rank 0 writes
the usual files; the frozen base is never gathered whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lorakit.persistence import adapter_tensors


def dtensor_cls() -> type:
    """``torch.distributed.tensor.DTensor`` (imported on first use: torch.distributed is slow to import)."""
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor, without importing torch.distributed."""
    return type(tensor).__name__ == "DTensor" or (
        isinstance(tensor, nn.Parameter) and type(tensor.data).__name__ == "DTensor"
    )


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a DTensor: every process must call it, in the same order)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, dtensor_cls()) else tensor


@contextlib.contextmanager
def whole_adapters(model: Any) -> Iterator[None]:
    """Inside, the tensors an adapter save writes are whole ``nn.Parameter``s, so ``model.save_pretrained``
    writes the usual files (a collective on entry: every process must enter, and each gets the whole tensors).

    FSDP2 itself swaps a module's registered parameters between sharded and unsharded; this swaps the adapter's
    for whole copies and puts the sharded ones back on exit. Nothing may run forward inside. A model with no
    sharded adapter tensor passes through unchanged (no communication).
    """
    saved = {id(t) for name in model.peft_config for t in adapter_tensors(model.base_model, name, "auto").values()}
    swaps = []
    for module in model.modules():
        for attr, param in list(module._parameters.items()):
            if param is not None and id(param) in saved and isinstance(param, dtensor_cls()):
                swaps.append((module, attr, param, nn.Parameter(full(param), requires_grad=param.requires_grad)))
    for module, attr, _, whole in swaps:
        module._parameters[attr] = whole
    try:
        yield
    finally:
        for module, attr, sharded, _ in swaps:
            module._parameters[attr] = sharded
