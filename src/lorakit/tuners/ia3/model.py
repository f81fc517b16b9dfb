"""IA³'s tuner: which modules get an IA³ layer, and whether each rescales its input or its output.

Everything else (injection with rollback, switching, disabling, merging, unloading, ``modules_to_save``,
batches that mix adapters) is the shared engine, :class:`~lorakit.tuners.base.BaseTuner`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.config import register_method
from lorakit.errors import (
    ConfigError,
    MergeError,
    UnsupportedModuleError,
)
from lorakit.layers.kinds import EmbeddingKind, HFConv1DKind
from lorakit.targeting import matches_selector, resolve_target_modules
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.ia3.config import IA3Config
from lorakit.tuners.ia3.layer import IA3Layer


class IA3Model(BaseTuner):
    """A model with IA³ adapters (Liu et al. 2022, arXiv 2205.05638): see :class:`BaseTuner`."""

    prefix = "ia3_"
    config_class = IA3Config
    layer_type = IA3Layer

    def _plan(self, name: str, adapter_name: str) -> tuple[str, nn.Module, Any]:
        """As :meth:`BaseTuner._plan`; an embedding is refused (a lookup has no input features to rescale, and
        PEFT refuses it too)."""
        plan = super()._plan(name, adapter_name)
        if isinstance(plan[2], EmbeddingKind):
            raise UnsupportedModuleError(
                f"target module {name!r} is an embedding, which IA³ cannot wrap; supported: torch.nn.Linear, "
                "torch.nn.Conv1d/2d/3d, transformers.pytorch_utils.Conv1D, bitsandbytes.nn.Linear4bit/Linear8bitLt. "
                "Narrow target_modules to such layers."
            )
        return plan

    def _before_inject(self, plans: list[tuple[str, nn.Module, Any]], config: IA3Config) -> Callable[[], None]:
        config.feedforward_for(self._model_type())  # no default for this architecture: refuse before any change
        return lambda: None

    def _create_and_replace(self, plan: tuple[str, nn.Module, Any], adapter_name: str, config: IA3Config) -> None:
        name, module, kind = plan
        layer = module if isinstance(module, IA3Layer) else IA3Layer(module, kind)
        layer.add(
            adapter_name,
            feedforward=self.is_feedforward(name, config),
            init_ia3_weights=config.init_ia3_weights,
            dtype=self._adapter_dtype(layer),
        )
        if layer is not module:
            self._replace(name, layer)

    def is_feedforward(self, name: str, config: IA3Config) -> bool:
        """Whether module ``name`` is one of ``config``'s feedforward modules (PEFT's rule: a regex must match the
        full name; a list entry must end it)."""
        selector = config.feedforward_for(self._model_type())
        if isinstance(selector, str):
            return matches_selector(name, selector)
        return any(name.endswith(entry) for entry in selector)

    def _model_type(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def file_config(self, adapter_name: str, config: IA3Config) -> IA3Config:
        """The config as the adapter file holds it (``config`` is a copy the caller owns; changed in place).

        PEFT fills in the architecture's default ``target_modules`` and ``feedforward_modules``, expands
        ``"all-linear"`` and writes ``fan_in_fan_out=True`` for transformers' ``Conv1D``; lorakit writes the same,
        while its in-memory config stays as the user gave it.
        """
        config.feedforward_modules = config.feedforward_for(self._model_type())
        config.target_modules = resolve_target_modules(self.model, config)
        layers = [layer for _, layer in self.weight_layers() if adapter_name in layer.ia3_l]
        if any(isinstance(layer.kind, HFConv1DKind) for layer in layers):
            config.fan_in_fan_out = True
        return config

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add adapter ``adapter_name`` whose vector on every module is ``Σ weights[i] · l[adapters[i]]`` (PEFT's
        ``IA3Model.add_weighted_adapter``, the same rule: a source without a vector on a module adds nothing there).

        The new adapter targets the union of the sources' modules, is frozen (as in PEFT) and not made active.
        On any error the model is left as it was.

        Raises:
            AdapterNotFoundError / AdapterExistsError: unknown source names, or ``adapter_name`` taken (PEFT
                silently returns; lorakit says so).
            ConfigError: weights that are not one finite number per source; sources whose targets mix names and
                regexes; two sources training the same module in full (``modules_to_save``).
            MergeError: a source adapter is merged into the base weights.
        """
        target_modules, feedforward_modules = self._check_weighted(adapters, weights, adapter_name)
        config = dataclasses.replace(
            self.peft_config[adapters[0]], target_modules=target_modules, feedforward_modules=feedforward_modules
        )
        self.peft_config[adapter_name] = config
        try:
            self.inject(adapter_name, config)
            with torch.no_grad():
                for _, layer in self.weight_layers():
                    if adapter_name not in layer.ia3_l:
                        continue
                    new = torch.zeros_like(layer.ia3_l[adapter_name], dtype=torch.float32)
                    for source, weight in zip(adapters, weights):
                        if source in layer.ia3_l:
                            new += weight * layer.ia3_l[source].float()
                    layer.ia3_l[adapter_name].copy_(new)
                    layer.ia3_l[adapter_name].requires_grad_(False)
        except BaseException:
            if any(adapter_name in layer.ia3_l for _, layer in self.weight_layers()):
                self.remove_adapter_layers(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self.set_adapter(self.active_adapters)  # the new adapter stays frozen and inactive

    def _check_weighted(self, adapters: list[str], weights: list[float], adapter_name: str) -> tuple[Any, Any]:
        self._check_weighted_sources(adapters, weights, adapter_name)
        configs = self.peft_config
        saving = [a for a in adapters if configs[a].modules_to_save]
        if len(saving) > 1:
            raise ConfigError(
                f"adapters {saving} each train whole modules (modules_to_save); at most one source may, as in PEFT"
            )
        merged = sorted({a for _, layer in self.weight_layers() for a in layer.merged_adapters if a in adapters})
        if merged:
            raise MergeError(f"adapters {merged} are merged into the base weights; unmerge them first")
        targets = [configs[a].target_modules for a in adapters]
        if len({repr(t) for t in targets}) > 1:  # None / all-linear made concrete before they are joined
            targets = [resolve_target_modules(self.model, configs[a]) for a in adapters]
        model_type = self._model_type()
        return (
            _union(targets, "target_modules"),
            _union([configs[a].feedforward_for(model_type) for a in adapters], "feedforward_modules"),
        )


def _union(selectors: list[Any], field: str) -> Any:
    """PEFT's union of module selectors: regexes joined by ``|``, name lists merged (sorted, for a stable file)."""
    if len({repr(s) for s in selectors}) == 1:
        return selectors[0]
    if all(isinstance(s, str) for s in selectors):
        return "|".join(f"({s})" for s in selectors)
    if all(isinstance(s, (list, set, tuple)) for s in selectors):
        return sorted({name for s in selectors for name in s})
    raise ConfigError(f"the adapters' {field} mix names and regexes; combine adapters targeted alike")


register_method(IA3Config, IA3Model)
