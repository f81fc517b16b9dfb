"""Adapter layers: the update (:mod:`.delta`), per-base-type geometry (:mod:`.kinds`), the wrappers."""

from lorakit.layers.delta import lora_delta, lora_scaling
from lorakit.layers.kinds import KINDS, LayerKind, kind_for
from lorakit.layers.lora import AdapterLayer, LoraLayer
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.quantized import Linear4bitKind, Linear8bitKind  # importing registers them

__all__ = [
    "KINDS",
    "AdapterLayer",
    "LayerKind",
    "Linear4bitKind",
    "Linear8bitKind",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "kind_for",
    "lora_delta",
    "lora_scaling",
]
