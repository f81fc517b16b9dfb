"""LoRA's tuner: which layer a targeted module becomes, and with what rank, alpha, variant and dtype.

Everything else (injection with rollback, switching, disabling, merging, unloading, ``modules_to_save``,
biases, mixed-adapter batches) is the shared engine, :class:`~lorakit.tuners.base.BaseTuner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lorakit.config import pattern_value, register_method
from lorakit.layers.kinds import HFConv1DKind
from lorakit.targeting import ALL_LINEAR, all_linear_suffixes
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.lora.combine import add_weighted_adapter
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.layer import LoraLayer


class LoraModel(BaseTuner):
    """A model with LoRA adapters (and DoRA, rsLoRA, LoftQ as their options): see :class:`BaseTuner`."""

    prefix = "lora_"
    config_class = LoraConfig
    layer_type = LoraLayer

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """``(name, layer)`` of every LoRA layer (PEFT-era name of :meth:`weight_layers`)."""
        return self.weight_layers()

    def _before_inject(self, plans: list[tuple[str, nn.Module, Any]], config: LoraConfig) -> Callable[[], None]:
        """LoftQ rewrites base weights: keep them so that a failed injection leaves the model as it was."""
        if config.init_lora_weights != "loftq":
            return lambda: None
        bases = [m.base_layer if isinstance(m, LoraLayer) else m for _, m, _ in plans]
        originals = [kind.base_weight(b).detach().clone() for (_, _, kind), b in zip(plans, bases)]

        @torch.no_grad()
        def restore() -> None:
            for (_, _, kind), b, weight in zip(plans, bases, originals):
                kind.base_weight(b).copy_(weight)

        return restore

    def _create_and_replace(self, plan: tuple[str, nn.Module, Any], adapter_name: str, config: LoraConfig) -> None:
        name, module, kind = plan
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module, kind)
        r, variant = self._layer_form(config, name)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer.add(
            adapter_name,
            r,
            alpha,
            config.lora_dropout,
            config.init_lora_weights,
            config.use_rslora,
            dtype=self._adapter_dtype(layer),
            loftq_config=config.loftq_config,
            variant=variant,
        )
        if config.use_dora:
            layer.lora_magnitude_vector[adapter_name].grad_through_norm = config.dora_grad_through_norm
        if layer is not module:
            self._replace(name, layer)

    def _layer_form(self, config: LoraConfig, name: str) -> tuple[int, str]:
        """``(rank, variant name)`` of the adapter that ``config`` puts on module ``name``."""
        return pattern_value(config.rank_pattern, name, config.r), "dora" if config.use_dora else "lora"

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """A new adapter from weighted existing ones (PEFT's arguments; see :mod:`lorakit.tuners.lora.combine`)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    def file_config(self, adapter_name: str, config: LoraConfig) -> LoraConfig:
        """The config as the adapter file holds it (``config`` is a copy the caller owns; changed in place).

        PEFT writes ``fan_in_fan_out=True`` for transformers' ``Conv1D`` layers and ``"all-linear"`` expanded to
        the module names (readers such as vLLM check them); lorakit's in-memory config stays as the user gave it.
        """
        if any(isinstance(layer.kind, HFConv1DKind) and adapter_name in layer.r for _, layer in self.lora_layers()):
            config.fan_in_fan_out = True
        if config.target_modules == ALL_LINEAR:
            config.target_modules = all_linear_suffixes(self.model)
        return config


register_method(LoraConfig, LoraModel)
