"""Bottleneck adapters' tuner: where each block's adapters sit, and the refusal to merge them.

Targets come from a placement (``DEFAULT_PLACEMENTS`` by architecture, or ``config.placement``), not from
``target_modules``: per transformer block, the module after the attention sub-block and the one after the
feed-forward sub-block. Everything else (injection with rollback, switching, disabling, unloading,
``modules_to_save``, batches that mix adapters) is the shared engine, :class:`~lorakit.tuners.base.BaseTuner`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from lorakit.config import register_method
from lorakit.errors import AdapterExistsError, ConfigError, MergeError, TargetNotFoundError
from lorakit.layers.base import AdapterLayer
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.bottleneck.config import SUBLAYERS, BottleneckConfig
from lorakit.tuners.bottleneck.layer import BottleneckLayer, merge_refusal


class Site(NamedTuple):
    """One place an adapter goes: the module it follows, and what it reads there."""

    sublayer: str  # "attention" or "feedforward"
    block: str  # the block's module name
    index: int  # the block's index (leave_out, per-block reduction factors)
    residual: nn.Module | None  # the module whose first input is the residual stream
    norm: nn.Module | None  # the model's post-LN norm after the residual add
    bottleneck: int  # the bottleneck size m


class BottleneckModel(BaseTuner):
    """A model with bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2020, arXiv
    2005.00247): see :class:`BaseTuner`."""

    prefix = "bottleneck_"
    config_class = BottleneckConfig
    layer_type = BottleneckLayer

    # -- where the adapters go -------------------------------------------------------------------------

    def _targets(self, config: BottleneckConfig) -> list[str]:
        """The modules each adapter follows, in model order; every check happens here, before any change.

        Raises:
            ConfigError: no placement known for this architecture, a placement that lacks what the config needs
                (a ``residual`` module, a post-LN ``norm``), a hidden size the reduction factor does not divide.
            TargetNotFoundError: the placement names modules this model does not have.
        """
        placement = config.placement_for(self._model_type())
        hidden = self._hidden_size()
        pattern = re.compile(rf"(?:.*\.)?{re.escape(placement['blocks'])}\.(\d+)")
        blocks = [
            (name, int(match.group(1)))
            for name, _ in self.model.named_modules()
            if (match := pattern.fullmatch(name)) and not self._inside_adapter_layer(name)
        ]
        if not blocks:
            raise TargetNotFoundError(
                f"placement blocks={placement['blocks']!r} matched no block of {type(self.model).__name__} (a module "
                "named <...>.<blocks>.<index>); give placement= naming this model's list of blocks"
            )
        sites: dict[str, Site] = {}
        for block, index in blocks:
            if index in config.leave_out:
                continue
            for sublayer, wanted in zip(SUBLAYERS, (config.mh_adapter, config.output_adapter)):
                if wanted:
                    name, site = self._site(placement, sublayer, block, index, config, hidden)
                    sites[name] = site
        self.__dict__["_planned_sites"] = sites
        return list(sites)

    def _site(
        self, placement: dict[str, Any], sublayer: str, block: str, index: int, config: BottleneckConfig, hidden: int
    ) -> tuple[str, Site]:
        spec = placement.get(sublayer)
        flag = "mh_adapter" if sublayer == "attention" else "output_adapter"
        if spec is None:
            raise ConfigError(
                f"{flag}=True puts an adapter after the {sublayer} block, but the placement has no {sublayer!r}"
            )
        name = f"{block}.{spec['output']}"
        self._module(name, f"placement[{sublayer!r}]['output']")
        residual = norm = None
        if config.needs_residual:
            if not spec.get("residual"):
                why = "is_parallel=True" if config.is_parallel else "original_ln_before=True (Pfeiffer)"
                raise ConfigError(
                    f"{why} reads the residual stream entering the {sublayer} block, but the placement names no "
                    f"'residual' module for it (the module whose first input that stream is, e.g. 'input_layernorm')"
                )
            residual = self._module(f"{block}.{spec['residual']}", f"placement[{sublayer!r}]['residual']")
        if spec.get("norm"):
            norm = self._module(f"{block}.{spec['norm']}", f"placement[{sublayer!r}]['norm']")
        if config.residual_before_ln == "post_add" and norm is None:
            raise ConfigError(
                "residual_before_ln='post_add' takes the skip connection before the model's own post-LN norm, and "
                f"this model's {sublayer} block has none (a pre-LN model); accepted here: true or false"
            )
        factor = config.factor_for(index)
        size = hidden / factor
        if size < 1 or size != int(size):
            raise ConfigError(
                f"reduction_factor={factor!r} does not divide hidden_size={hidden} into a whole bottleneck size "
                f"(block {index}); accepted: a factor such that hidden_size / factor is a whole number ≥ 1, e.g. "
                f"{[f for f in (2, 4, 8, 16, 32, 64) if hidden % f == 0]}"
            )
        return name, Site(sublayer, block, index, residual, norm, int(size))

    def _module(self, name: str, what: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise TargetNotFoundError(
                f"{what} points at {name!r}, which {type(self.model).__name__} does not have; give placement= "
                "naming this model's modules"
            ) from None

    def _plan(self, name: str, adapter_name: str) -> tuple[str, nn.Module, Any]:
        module = self.model.get_submodule(name)
        if isinstance(module, BottleneckLayer) and adapter_name in module.adapter_names():
            raise AdapterExistsError(f"module {name!r} already holds an adapter named {adapter_name!r}")
        return name, module, self.__dict__["_planned_sites"][name]

    def _create_and_replace(self, plan: tuple[str, nn.Module, Site], adapter_name: str, config: BottleneckConfig):
        name, module, site = plan
        layer = module
        if not isinstance(module, BottleneckLayer):
            layer = BottleneckLayer(module, self._hidden_size(), site.sublayer, site.block, site.norm)
        dtype, device = self._dtype_and_device(module)
        layer.add(adapter_name, config, site.bottleneck, site.residual, dtype=dtype, device=device)
        if layer is not module:
            self._replace(name, layer)

    def _model_type(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def _hidden_size(self) -> int:
        hidden = getattr(getattr(self.model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int) or hidden <= 0:
            raise ConfigError(
                f"bottleneck adapters need the model's hidden size (config.hidden_size), which "
                f"{type(self.model).__name__} does not give; adapt a transformers model"
            )
        return hidden

    def _dtype_and_device(self, module: nn.Module) -> tuple[torch.dtype, torch.device]:
        """New adapters take the site's (else the model's) floating dtype, fp32 for a half-precision base (PEFT's
        ``autocast_adapter_dtype``), and its device."""
        params = [p for p in (*module.parameters(), *self.model.parameters()) if p.is_floating_point()]
        if not params:
            return torch.float32, torch.device("cpu")
        dtype, device = params[0].dtype, params[0].device
        if self.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        return dtype, device

    def file_config(self, adapter_name: str, config: BottleneckConfig) -> BottleneckConfig:
        """The file names the placement it was made with (the architecture's entry when the config gave None), so
        it keeps its meaning whatever later versions put in ``DEFAULT_PLACEMENTS``."""
        config.placement = config.placement_for(self._model_type())
        return config

    # -- merging: refused; unloading: the taps go too -------------------------------------------------

    def _refuse_merge(self) -> None:
        layers = [layer for _, layer in self.weight_layers()]
        raise MergeError(merge_refusal([o.non_linearity for layer in layers for o in layer.options.values()]))

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Always raises :class:`MergeError` (see :func:`merge_refusal`); nothing changes."""
        self._refuse_merge()

    def unload(self, merge: bool, safe_merge: bool = False, adapter_names=None, dequantize_dtype=None) -> nn.Module:
        """Take every adapter layer (and residual tap) out; the model is the base model again, byte for byte.

        Raises:
            MergeError: ``merge=True`` (``merge_and_unload``): nothing is merged or changed.
        """
        if merge:
            self._refuse_merge()
        layers = [layer for _, layer in self.weight_layers()]
        model = super().unload(merge=False)
        for layer in layers:
            layer.release()
        return model

    def remove_adapter_layers(self, adapter_name: str) -> None:
        layers = [layer for _, layer in self.weight_layers()]
        super().remove_adapter_layers(adapter_name)
        kept = {id(layer) for _, layer in self.weight_layers()}
        for layer in layers:
            if id(layer) not in kept:
                layer.release()

    def _before_inject(self, plans: list[tuple[str, nn.Module, Any]], config: BottleneckConfig) -> Callable[[], None]:
        self.__dict__.pop("_planned_sites", None)  # used by _plan only
        return lambda: None

    def sites(self) -> dict[str, AdapterLayer]:
        """Module name -> bottleneck layer, in model order."""
        return dict(self.weight_layers())


register_method(BottleneckConfig, BottleneckModel)
