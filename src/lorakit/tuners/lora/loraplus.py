"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): the B factors learn ``ratio`` times faster than the A factors.

The paper (§3, Theorem 1) shows that with one learning rate for A ``(r, in)`` and B ``(out, r)`` the features
learnt by a wide model are inefficient; setting ηB = λ·ηA with λ ≫ 1 (§4 uses λ = 2⁴) fixes it. Parameters are
found by type: the factors held in a :class:`~lorakit.tuners.lora.layer.LoraLayer`'s A / B containers (the layer
kind's ``containers``: ``lora_A``/``lora_B``, or ``lora_embedding_A``/``lora_embedding_B``). The groups match
PEFT's ``peft.optimizers.create_loraplus_optimizer``:

* ``A``: A factors and every other trainable tensor of 2 or more dimensions (AdaLoRA's ``lora_E``,
  ``modules_to_save`` weights), at ``lr``;
* ``embedding``: the factors of adapted embeddings, at ``lr_embedding`` (1e-6 by default);
* ``B``: B factors and every other trainable 1-D tensor (DoRA's magnitudes, biases, norm weights), at
  ``lr · ratio``; split into a decayed group and a no-decay group (biases and ``nn.LayerNorm`` parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.tuners.lora.kinds import EmbeddingOps
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.mha import LoraMultiheadAttention

#: bitsandbytes' 8-bit optimizers: PEFT keeps ``nn.Embedding`` weights at 32-bit state under them.
_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def loraplus_param_groups(
    model: nn.Module, *, lr: float, ratio: float, weight_decay: float = 0.0, lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """The four LoRA+ parameter groups of ``model``'s trainable tensors, in PEFT's order.

    Args:
        model: any module holding LoRA layers (a ``PeftModel``, a ``LoraModel``, or a plain model with adapters).
        lr: ηA, the learning rate of the A factors (and of the other tensors of 2 or more dimensions).
        ratio: λ = ηB / ηA (arXiv 2402.12354 §4; the paper suggests 2⁴ for most tasks, ``>= 1``).
        weight_decay: decay of every group except the B-side biases and ``nn.LayerNorm`` parameters (PEFT's
            ``loraplus_weight_decay``, 0 by default).
        lr_embedding: learning rate of adapted embeddings' factors (PEFT's ``loraplus_lr_embedding``).

    Returns:
        ``[A, embedding, B, B_no_decay]`` as ``{"params", "lr", "weight_decay", "name"}`` dicts; a group may be
        empty, as in PEFT.
    """
    embedding, b_side = set(), set()
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if isinstance(layer.kind, EmbeddingOps):  # PEFT: every tensor one container below its Embedding layer
            for child in layer.children():
                embedding.update(id(p) for p in child.parameters(recurse=False))
        b_side.update(id(p) for p in getattr(layer, layer.kind.containers[1]).parameters())
        if isinstance(layer, LoraMultiheadAttention):  # its out-projection's B factors are B's too (as in PEFT)
            b_side.update(id(p) for p in layer.lora_out_proj.lora_B.parameters())
    no_decay = _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():  # deduplicated, in registration order (as PEFT's named_parameters)
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif id(p) in b_side or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio, "B_no_decay": lr * ratio}
    return [
        {"params": ps, "lr": rates[k], "weight_decay": 0.0 if k == "B_no_decay" else weight_decay, "name": k}
        for k, ps in groups.items()
    ]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over :func:`loraplus_param_groups` (PEFT's ``create_loraplus_optimizer``).

    Args:
        model: the model whose trainable tensors are optimized.
        optimizer_cls: e.g. ``torch.optim.AdamW`` or a bitsandbytes 8-bit optimizer (adapted embeddings then keep
            32-bit state, as in PEFT).
        lr: ηA.
        loraplus_lr_ratio: ηB / ηA (arXiv 2402.12354 §4).
        **kwargs: ``loraplus_weight_decay`` (0.0) and ``loraplus_lr_embedding`` (1e-6), and the rest for
            ``optimizer_cls`` (a ``weight_decay`` here is overridden by every group's own, as in PEFT).

    Returns:
        The optimizer; its groups carry a ``name`` (``A``, ``embedding``, ``B``, ``B_no_decay``).
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_param_groups(
        model, lr=lr, ratio=loraplus_lr_ratio, weight_decay=weight_decay, lr_embedding=lr_embedding
    )
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        import bitsandbytes  # only reached with one of its optimizer classes in hand

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def _no_decay(model: nn.Module) -> set[int]:
    """Ids of the tensors PEFT exempts from decay: biases, and the parameters of ``nn.LayerNorm`` modules."""
    out = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            out.update(id(p) for p in module.parameters())
        bias = module._parameters.get("bias")
        if bias is not None:
            out.add(id(bias))
    return out
