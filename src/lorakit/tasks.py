"""The task classes (PEFT's names: ``PeftModelForCausalLM``...) and :func:`get_peft_model`, which picks one.

A task class only spells out the forward arguments of its kind of model. What ``inspect.signature(model.forward)``
reports (the HF Trainer keeps the dataset columns it names) is the base model's own signature plus
``adapter_names``, for these classes as for :class:`~lorakit.PeftModel` (:mod:`lorakit.forward_signature`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.config import PeftConfig, TaskType
from lorakit.errors import ConfigError
from lorakit.forward_signature import reports_base_signature
from lorakit.model import PeftModel, base_name_or_path


class _TransformersForward(PeftModel):
    """A forward that names the usual transformers inputs; anything else passes through ``**kwargs``."""

    @reports_base_signature
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return self._run(named, kwargs)


class PeftModelForCausalLM(_TransformersForward):
    """PEFT name for a causal language model with adapters."""


class PeftModelForSeq2SeqLM(PeftModel):
    """PEFT name for an encoder-decoder model with adapters."""

    @reports_base_signature
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            labels=labels,
        )
        return self._run(named, kwargs)


class PeftModelForSequenceClassification(_TransformersForward):
    """PEFT name for a sequence classifier; the head (``classifier``/``score``) trains in full."""


class PeftModelForTokenClassification(_TransformersForward):
    """PEFT name for a token classifier; the head (``classifier``/``score``) trains in full."""


class PeftModelForQuestionAnswering(PeftModel):
    """PEFT name for extractive QA; the ``qa_outputs`` head trains in full."""

    @reports_base_signature
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            start_positions=start_positions,
            end_positions=end_positions,
        )
        return self._run(named, kwargs)


class PeftModelForFeatureExtraction(_TransformersForward):
    """PEFT name for an encoder used for embeddings."""


MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType | None, type[PeftModel]] = {
    None: PeftModel,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter; the task type in the config picks the wrapper class.

    The base model's parameters are frozen; only the adapter (plus any biases and ``modules_to_save`` the
    config asks for) requires grad.

    Raises:
        ConfigError: invalid config for this model (targets that match nothing, unsupported module types...).
    """
    if mixed:
        raise ConfigError("mixed=True (PeftMixedModel) is not supported by lorakit; use mixed=False")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}; get_peft_model needs a torch.nn.Module")
    if revision is not None:
        peft_config.revision = revision
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = base_name_or_path(model)
    model_cls = MODEL_TYPE_TO_PEFT_MODEL[peft_config.task_type]
    return model_cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
