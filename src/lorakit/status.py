"""What state a model's adapters are in: PEFT's :func:`get_layer_status` and :func:`get_model_status`.

The same dataclasses and fields as PEFT 0.21 (``peft.peft_model.TunerLayerStatus`` / ``TunerModelStatus``), computed
by PEFT's rules, for a :class:`~lorakit.PeftModel` of a weight method or a plain model holding lorakit adapter
layers (:func:`~lorakit.inject_adapter_in_model`). A field that disagrees across layers reads ``"irregular"``: the
model is in a state no single switch produced.

``module_type`` follows PEFT's rule (the layer's class name, as its ``repr`` begins), applied to lorakit's layers:
``"LoraLayer"``, ``"IA3Layer"``, ``"BottleneckLayer"``, ``"ModulesToSaveWrapper"`` (PEFT's own classes give
``"lora.Linear"``, ``"lora.Embedding"``, ``"Linear"`` for IA³...; the wrapper's name is the same in both).
``quantization_backend`` is None, as PEFT reports for its LoRA and IA³ layers, bitsandbytes ones included.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PreTrainedModel

from lorakit.errors import ConfigError
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper
from lorakit.tuners.base import BaseTuner, Tuner

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer (PEFT's fields). ``requires_grad`` and ``devices`` are per adapter held."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model (PEFT's fields): each layer-level field folded over the layers."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _root(model: nn.Module) -> nn.Module:
    """What the layer names are relative to: a PeftModel's tuner (``model.<path>``, as PEFT names them), else the
    model itself.

    Raises:
        ConfigError: a PeftModel of a prompt-learning method (no adapter layers; PEFT raises TypeError).
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, Tuner):
        return model
    if not isinstance(tuner, BaseTuner):
        raise ConfigError(
            f"get_layer_status() and get_model_status() report adapter layers; {type(tuner).__name__}'s adapters are "
            "prompts given to the model's inputs, not layers (PEFT refuses prompt learning here too)"
        )
    return tuner


def _fold(values: list[bool]) -> bool | Irregular:
    return True if all(values) else False if not any(values) else "irregular"


def _layer_status(name: str, layer: AdapterLayer) -> TunerLayerStatus:
    held = layer.adapter_names()
    params = {adapter: layer.adapter_parameters(adapter) for adapter in held}
    wrapper = isinstance(layer, ModulesToSaveWrapper)
    return TunerLayerStatus(
        name=name,
        module_type=type(layer).__name__,
        enabled=not layer.disable_adapters,
        # PEFT: a weight layer reports the adapters it was told to run, a module copy only the one it runs
        active_adapters=list(layer.active_adapters) if wrapper else layer.selected_adapters,
        merged_adapters=list(getattr(layer, "merged_adapters", [])),
        requires_grad={a: _fold([p.requires_grad for p in ps]) for a, ps in params.items() if ps},
        available_adapters=sorted(held),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        quantization_backend=None,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each adapter layer of ``model`` (PEFT's ``get_layer_status``), in module order.

    Args:
        model: a :class:`~lorakit.PeftModel` (layer names begin ``model.``, as PEFT's), or any module holding
            lorakit adapter layers (names relative to it).

    Raises:
        ConfigError: no adapter layer in the model, or a prompt-learning PeftModel.
    """
    root = _root(model)
    found = [_layer_status(n, m) for n, m in root.named_modules() if isinstance(m, AdapterLayer)]
    if not found:
        raise ConfigError(
            f"no adapter layers found in this {type(model).__name__}: get_layer_status() reads a PeftModel or a model "
            "given adapters with inject_adapter_in_model()"
        )
    return found


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts as PEFT's ``get_nb_trainable_parameters`` counts a plain module."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 shards
            n = param.ds_numel
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model``'s adapters as a whole (PEFT's ``get_model_status``): see :class:`TunerModelStatus`.

    Raises:
        ConfigError: as :func:`get_layer_status`.
    """
    root = _root(model)
    layers = get_layer_status(model)
    if root is model:
        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        trainable, total = count_parameters(model)
        peft_types: dict[str, str] = {}
        adapter_model_type = "None"
    else:
        base_model_type = type(model.get_base_model()).__name__
        trainable, total = model.get_nb_trainable_parameters()
        peft_types = {name: getattr(c.peft_type, "value", str(c.peft_type)) for name, c in root.peft_config.items()}
        adapter_model_type = type(root).__name__

    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_anywhere = set().union(*(s.merged_adapters for s in layers))
    # an adapter merged in one layer but held unmerged in another: the model is half merged
    half = any((set(s.available_adapters) - set(s.merged_adapters)) & merged_anywhere for s in layers)
    grads: dict[str, list[bool | Irregular]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads[adapter].append(value)
        for adapter, types in s.devices.items():
            devices[adapter].update(types)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters="irregular" if half else sorted(merged_anywhere),
        requires_grad={
            a: True if all(v is True for v in vs) else False if all(v is False for v in vs) else "irregular"
            for a, vs in grads.items()
        },
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={a: sorted(types) for a, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
