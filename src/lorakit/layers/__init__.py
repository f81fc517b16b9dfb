"""Adapter layers: the update (:mod:`.delta`), per-base-type geometry (:mod:`.kinds`), the wrappers."""

from lorakit.layers.delta import lora_delta, lora_scaling
from lorakit.layers.kinds import KINDS, LayerKind, kind_for
from lorakit.layers.lora import AdapterLayer, LoraLayer
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.quantized import is_bnb_layer

__all__ = [
    "KINDS",
    "AdapterLayer",
    "LayerKind",
    "LoraLayer",
    "ModulesToSaveWrapper",
    "is_bnb_layer",
    "kind_for",
    "lora_delta",
    "lora_scaling",
]
