"""IA³'s tuner: which modules get an IA³ layer, and whether each rescales its input or its output.

Everything else (injection with rollback, switching, disabling, merging, unloading, ``modules_to_save``,
batches that mix adapters) is the shared engine, :class:`~lorakit.tuners.base.BaseTuner`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.config import register_method
from lorakit.errors import UnsupportedModuleError
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


register_method(IA3Config, IA3Model)
