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
from lorakit.errors import ConfigError
from lorakit.layers.kinds import HFConv1DKind, kind_for
from lorakit.targeting import ALL_LINEAR, all_linear_suffixes
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.lora.combine import add_weighted_adapter
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.corda import corda_initialize, keep_corda_bases
from lorakit.tuners.lora.kinds import lora_kind
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.mha import MHA_KIND
from lorakit.tuners.lora.moe import convert_moe_targets
from lorakit.tuners.lora.param_names import strip_wrappers
from lorakit.tuners.lora.param_targets import inject_parameters, lora_targets
from lorakit.tuners.lora.param_wrapper import ParamLoraLayer
from lorakit.tuners.lora.start_conversion import converted_adapter
from lorakit.tuners.lora.starts import prepare, start_name
from lorakit.tuners.tying import tie_lora_targets, tied_lora_targets


class LoraModel(BaseTuner):
    """A model with LoRA adapters (and DoRA, rsLoRA, LoftQ as their options): see :class:`BaseTuner`."""

    prefix = "lora_"
    config_class = LoraConfig
    layer_type = LoraLayer

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """``(name, layer)`` of every LoRA layer (PEFT-era name of :meth:`weight_layers`)."""
        return self.weight_layers()

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules holding LoRA adapters through ``target_modules`` (PEFT's list: parameters are apart)."""
        return [name for name, layer in self.weight_layers() if not isinstance(layer, ParamLoraLayer)]

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The parameters holding LoRA adapters through ``target_parameters``, full names (PEFT's attribute)."""
        return [
            f"{strip_wrappers(n)}.{la.parameter_name}"
            for n, la in self.weight_layers()
            if isinstance(la, ParamLoraLayer)
        ]

    def _targets(self, config: LoraConfig) -> list[str]:
        """The modules ``target_modules`` selects, with every ``target_parameters`` check made first (PEFT's MoE
        rewrite of v4 names applied to ``config`` in place, :mod:`lorakit.tuners.lora.moe`)."""
        if config.peft_type == self.config_class.PEFT_TYPE == LoraConfig.PEFT_TYPE:
            convert_moe_targets(self.model, config)
        return tied_lora_targets(self.model, config, lora_targets(self, config))  # + ensure_weight_tying's

    def _after_inject(self, adapter_name: str, config: LoraConfig) -> None:
        """The parameters ``target_parameters`` selects get their layers once the modules have theirs (PEFT's order)."""
        inject_parameters(self, adapter_name, config)
        tie_lora_targets(self.model, adapter_name, config)  # ensure_weight_tying: head factors = embedding's

    def _before_inject(self, plans: list[tuple[str, nn.Module, Any]], config: LoraConfig) -> Callable[[], None]:
        """LoftQ, PiSSA and OLoRA rewrite base weights: keep them so that a failed injection leaves the model as it
        was (a start's conditions are checked first, :func:`lorakit.tuners.lora.starts.prepare`)."""
        if start_name(config.init_lora_weights) is not None:
            modules = [
                (name, m.base_layer if isinstance(m, LoraLayer) else m, kind, *self._layer_form(config, name))
                for name, m, kind in plans
            ]
            return prepare(modules, config.init_lora_weights, shared=len(self.peft_config) > 1)
        if config.init_lora_weights == "corda":  # CorDA's residuals (corda.py): checked and kept the same way
            modules = [
                (name, m.base_layer if isinstance(m, LoraLayer) else m, kind, self._layer_form(config, name)[0])
                for name, m, kind in plans
            ]
            return keep_corda_bases(modules, shared=len(self.peft_config) > 1)
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
        layer_class = getattr(kind, "layer_class", None) or LoraLayer  # a kind with a layer of its own (mha.py)
        layer = module if isinstance(module, LoraLayer) else layer_class(module, kind)
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
            lora_bias=config.lora_bias,
        )
        if config.init_lora_weights == "corda":
            corda_initialize(layer, adapter_name)
        if config.use_dora:
            layer.lora_magnitude_vector[adapter_name].grad_through_norm = config.dora_grad_through_norm
        if layer is not module:
            self._replace(name, layer)

    def _kind_for(self, module: nn.Module) -> Any:
        """The shared geometry with LoRA's side (which also takes grouped convolutions), and LoRA's own kind for
        ``nn.MultiheadAttention`` (:mod:`lorakit.tuners.lora.mha`)."""
        if MHA_KIND.matches(module):
            return MHA_KIND
        kind = kind_for(module)
        return None if kind is None else lora_kind(kind)

    def _layer_form(self, config: LoraConfig, name: str) -> tuple[int, str]:
        """``(rank, variant name)`` of the adapter that ``config`` puts on module ``name``."""
        return pattern_value(config.rank_pattern, name, config.r), "dora" if config.use_dora else "lora"

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any) -> None:
        """A new adapter from weighted existing ones (PEFT's arguments; see :mod:`lorakit.tuners.lora.combine`).
        Adapters with ``target_parameters`` are refused, as in PEFT (ConfigError)."""
        with_parameters = [a for a in adapters if getattr(self.peft_config.get(a), "target_parameters", None)]
        if with_parameters:
            raise ConfigError(
                f"add_weighted_adapter does not combine adapters with target_parameters (as in PEFT): {with_parameters}"
            )
        add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs)

    def convert_for_initial_base(
        self, adapter_name: str, config: LoraConfig, tensors: dict[str, torch.Tensor], start: dict, path: str
    ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """A trained PiSSA/OLoRA adapter as plain LoRA of rank 2r on the original base, from the tensors of the
        adapter as created (``start``, read from ``path``): :mod:`lorakit.tuners.lora.start_conversion`."""
        return converted_adapter(self, adapter_name, config, tensors, start, path)

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
