"""lorakit models under the Hugging Face ``Trainer`` and TRL's trainers, as PEFT models run there.

transformers and TRL recognise an adapter model only as an instance of ``peft.PeftModel``, which a lorakit model
is not (lorakit never imports PEFT). These classes make the trainers treat a lorakit model as they treat a PEFT one:
``save_model`` and every checkpoint write an adapter folder, ``resume_from_checkpoint`` and
``load_best_model_at_end`` load one, and TRL computes its log-probabilities on the base model inside the adapter::

    from lorakit.integrations import Trainer            # transformers.Trainer with lorakit adapters
    from lorakit.integrations import SFTTrainer, DPOTrainer   # TRL's, likewise (needs `pip install trl`)

Nothing is imported until a name is asked for: ``import lorakit`` loads neither the Trainer nor TRL.
"""

from __future__ import annotations

from typing import Any

_WHERE = {
    "Trainer": "lorakit.integrations.trainer",
    "AdapterTrainerMixin": "lorakit.integrations.trainer",
    "load_adapters_in_place": "lorakit.integrations.trainer",
    "SFTTrainer": "lorakit.integrations.trl",
    "DPOTrainer": "lorakit.integrations.trl",
    "AdapterReference": "lorakit.integrations.trl",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit.integrations' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
