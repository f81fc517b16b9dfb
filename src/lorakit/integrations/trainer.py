"""The HF ``Trainer`` with lorakit models: adapter folders as checkpoints, resumed and reloaded in place.

transformers' ``Trainer`` special-cases adapter models only through ``isinstance(model, peft.PeftModel)``
(``_save``, ``_load_from_checkpoint``, ``_load_best_model``, its label names and label smoothing). For any other
model it writes the whole state dict (``model.safetensors``) and reads one back. :class:`AdapterTrainerMixin` gives
a lorakit model the PEFT treatment on any ``Trainer`` subclass:

- ``save_model`` and every checkpoint write the adapters with the model's own ``save_pretrained`` (PEFT's format:
  ``adapter_config.json`` + ``adapter_model.safetensors``, other adapters in subfolders), beside what the Trainer
  itself keeps there (optimizer, scheduler, RNG states, ``trainer_state.json``, the tokenizer, ``training_args.bin``);
  ``PeftModel.from_pretrained(base, checkpoint)`` loads one.
- ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved adapter weights into the live adapters,
  in place (the optimizer's parameters stay the same objects), after checking every file first.
- ``label_names``, ``can_return_loss`` and label smoothing's label shift are read from the base model's class, as
  the Trainer does for a PEFT model.

A checkpoint that holds a full state dict instead (written by the plain ``transformers.Trainer``) still resumes,
through the Trainer's own code.

Under accelerate's FSDP (``fsdp_version: 2``, PyTorch's ``fully_shard``), ``save_model`` gathers the adapter tensors
alone on every process (:func:`lorakit.sharding.whole_adapters`) and rank 0 writes the adapter folder; the frozen
base is never gathered. A checkpoint also keeps what the Trainer writes for resuming a sharded run (its FSDP model
and optimizer state, DCP shards with ``SHARDED_STATE_DICT``), and resuming goes through the Trainer's own code.
FSDP1 (flat parameters) is refused for lorakit models. DeepSpeed keeps the Trainer's own paths.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils.generic import can_return_loss, find_labels

from lorakit.config import CONFIG_NAME
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.model import PeftModel
from lorakit.persistence import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, adapter_tensors, load_adapter_state, read_adapter
from lorakit.sharding import whole_adapters

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the pickled TrainingArguments it keeps


def holds_adapter(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an adapter folder (PEFT's file names), not a full model checkpoint."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, CONFIG_NAME))


def load_adapters_in_place(model: PeftModel, folder: str | os.PathLike) -> list[str]:
    """Copy the weights saved in ``folder`` (by ``model.save_pretrained``) into the model's adapters of the same
    names: ``default`` from the folder's root, another adapter from ``<folder>/<name>/``.

    The live tensors are written in place, so an optimizer built on them stays valid. Every file is read and checked
    before any adapter is written, and a failure while writing puts back what was written: a refused load leaves the
    model unchanged.

    Returns:
        the names of the adapters loaded.

    Raises:
        AdapterFileError: the folder lacks an active adapter, holds another method's adapter, or its files are
            missing, corrupt or saved for another model (their keys or shapes).
        ShapeMismatchError: a tensor's shape differs from the model's.
    """
    folder = os.fspath(folder)
    tuner, plans = model.base_model, []
    for name, config in model.peft_config.items():
        sub = None if name == "default" else name
        if not holds_adapter(os.path.join(folder, sub) if sub else folder):
            if name in model.active_adapters:
                raise AdapterFileError(
                    f"{folder!r} holds no saved adapter {name!r} (expected {WEIGHTS_NAME!r} and {CONFIG_NAME!r} "
                    f"{'at its root' if sub is None else f'in {sub!r}'}); is it a checkpoint of this model?"
                )
            continue  # an inactive adapter the checkpoint did not keep stays as it is
        saved, state = read_adapter(folder, subfolder=sub)
        if saved.peft_type != config.peft_type:
            raise AdapterFileError(
                f"{folder!r} holds a {saved.peft_type.value} adapter {name!r}, but this model's {name!r} is "
                f"{config.peft_type.value}; resume from a checkpoint of this model"
            )
        plans.append((name, state))
    written: list[tuple[torch.Tensor, torch.Tensor]] = []  # (live tensor, its value before)
    try:
        for name, state in plans:
            owned = adapter_tensors(tuner, name, save_embedding_layers=True, loading=True)
            before = [(owned[k], owned[k].detach().clone()) for k in state if k in owned]
            load_adapter_state(tuner, name, state)  # checks every key and shape before it writes any
            written.extend(before)
    except BaseException:
        with torch.no_grad():
            for live, value in written:
                live.copy_(value)
        raise
    return [name for name, _ in plans]


def check_fsdp_version(trainer: Any) -> None:
    """Refuse FSDP1 for a lorakit model (its flat parameters hide the adapter tensors a save writes).

    Raises:
        ConfigError: the Trainer's accelerate FSDP plugin is FSDP1; says what to set.
    """
    if trainer.is_fsdp_enabled and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ConfigError(
            "a lorakit model under the Trainer's FSDP needs FSDP2 (PyTorch's fully_shard): set fsdp_version: 2 in "
            "the accelerate config or TrainingArguments(fsdp_config={'fsdp_version': 2}); FSDP1 flattens "
            "parameters, and lorakit saves its adapter from the unflattened ones"
        )


class AdapterTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass in the bases: ``class T(AdapterTrainerMixin, Trainer)``.

    With a lorakit model, checkpoints and ``save_model`` are adapter folders and resuming loads them (see the module
    docstring); with any other model the Trainer behaves exactly as without the mixin.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._lorakit_model()
        if model is None:
            return
        check_fsdp_version(self)
        base = type(model.get_base_model())
        if self.args.label_names is None:  # the Trainer reads these from the wrapper class; PEFT's from the base's
            self.label_names = find_labels(base)
        self.can_return_loss = can_return_loss(base)
        # Label smoothing shifts the labels of causal LMs, which the Trainer recognises by the model's class name.
        if self.label_smoother is not None and base.__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            self.label_smoother = functools.partial(self.label_smoother, shift_labels=True)

    def _lorakit_model(self, model: Any = None) -> PeftModel | None:
        """The lorakit model under ``model`` (default: the trained one) and any accelerate wrapper, or None."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        return unwrapped if isinstance(unwrapped, PeftModel) else None

    def _own_checkpoints(self, model: Any = None) -> PeftModel | None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None  # their sharded checkpoints go through the Trainer's own code
        return self._lorakit_model(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``; under FSDP, the adapter folder from the gathered adapter tensors alone
        (every process takes part; rank 0 writes), never the full model's state dict."""
        model = self._lorakit_model()
        if model is None or not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        with whole_adapters(model):  # a collective: every process gathers the adapter's shards
            self._write_adapter_folder(model, output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._own_checkpoints()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        self._write_adapter_folder(model, output_dir)

    def _write_adapter_folder(self, model: PeftModel, output_dir: str | None) -> None:
        """Rank 0 writes the adapters and what ``Trainer._save`` writes beside any model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, is_main_process=True)
        # What Trainer._save writes next to any model: the tokenizer or processor, and the arguments.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft_model = self._own_checkpoints(model)
        if peft_model is None or not holds_adapter(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters_in_place(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        peft_model = self._own_checkpoints()
        best = self.state.best_model_checkpoint
        if peft_model is None or not holds_adapter(best):
            return super()._load_best_model()
        load_adapters_in_place(peft_model, best)


class Trainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that checkpoints, resumes and reloads lorakit adapters as it does PEFT's."""
