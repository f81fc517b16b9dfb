"""What any method's layers reuse: the adapter-layer base (:mod:`.base`), per-base-type geometry (:mod:`.kinds`,
:mod:`.quantized`), ``modules_to_save`` copies and per-call row routing (:mod:`.routing`). A method's own layers
live in its room (LoRA's in :mod:`lorakit.tuners.lora`)."""

from lorakit.layers.base import ActiveAdapters, AdapterLayer
from lorakit.layers.kinds import KINDS, LayerKind, kind_for
from lorakit.layers.modules_to_save import ModulesToSaveWrapper
from lorakit.layers.quantized import Linear4bitKind, Linear8bitKind  # importing registers them

__all__ = [
    "KINDS",
    "ActiveAdapters",
    "AdapterLayer",
    "LayerKind",
    "Linear4bitKind",
    "Linear8bitKind",
    "ModulesToSaveWrapper",
    "kind_for",
]
