"""One forward per task type, as PEFT's task classes run a prompt-learning adapter.

Virtual tokens (prompt tuning, P-tuning): the prompt's embeddings go before the input's, the attention mask
gains ``num_virtual_tokens`` ones in front, and what is indexed by position follows: causal-LM labels get
``-100`` in front (no loss on virtual tokens), ``token_type_ids`` zeros. Prefix tuning: the prompt is every
layer's past keys and values, the mask gains the same ones and ``position_ids`` move by ``num_virtual_tokens``.

Where PEFT 0.21.2 fails or mislabels, lorakit does what the prompt implies instead (and says so here):
token-classification labels get ``-100`` in front like causal-LM ones (PEFT's lengths disagree and it raises),
question-answering ``start_positions``/``end_positions`` move by ``num_virtual_tokens`` to point at the same
tokens (PEFT leaves them pointing ``num_virtual_tokens`` too early).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lorakit.config import TaskType
from lorakit.errors import ConfigError

#: The task types a prompt-learning adapter runs (each has its forward below).
SUPPORTED = (
    TaskType.CAUSAL_LM,
    TaskType.SEQ_2_SEQ_LM,
    TaskType.SEQ_CLS,
    TaskType.TOKEN_CLS,
    TaskType.QUESTION_ANS,
    TaskType.FEATURE_EXTRACTION,
)
#: Tasks whose models read ``token_type_ids`` (BERT-style): kept, with zeros for the virtual tokens.
_TOKEN_TYPES = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)


def check_task(config: Any, others: list[Any]) -> None:
    """Refuse an adapter without a task type, or with another one than the model's other adapters.

    Raises:
        ConfigError: naming the accepted task types.
    """
    accepted = ", ".join(t.value for t in SUPPORTED)
    if config.task_type is None:
        raise ConfigError(
            f"{type(config).__name__} needs task_type, which says how the prompt meets the model's inputs and "
            f"labels; accepted: {accepted}"
        )
    if others and config.task_type not in others:
        raise ConfigError(
            f"this model's adapters have task_type={others[0].value!r}; a {config.task_type.value!r} adapter cannot "
            "join them"
        )


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ConfigError("a prompt-learning model needs input_ids or inputs_embeds")


def ones_before(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` ``(batch, n)`` with ``count`` ones in front: the virtual tokens are always attended to."""
    return torch.cat((mask.new_ones(mask.shape[0], count), mask), dim=1)


def adjust_ids(tuner: Any, config: Any, kwargs: dict[str, Any]) -> None:
    """PEFT's ``_adjust_prompt_learning_kwargs``: ``position_ids`` move past the prefix (prefix tuning) or are
    dropped (virtual tokens have no position of their own); ``token_type_ids`` are dropped where the task's
    models do not read them."""
    if kwargs.get("position_ids") is not None:
        if tuner.prompt_in_cache:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("position_ids are not used with virtual tokens; ignoring them (as PEFT does)", stacklevel=5)
            del kwargs["position_ids"]
    if config.task_type not in _TOKEN_TYPES and kwargs.get("token_type_ids") is not None:
        warnings.warn(
            f"token_type_ids are not used with a {config.task_type.value} prompt; ignoring them (as PEFT does)",
            stacklevel=5,
        )
        del kwargs["token_type_ids"]


def run(tuner: Any, kwargs: dict[str, Any]) -> Any:
    """Run ``tuner.model`` with the active adapter's prompt (the task's rules); ``kwargs`` are the model's inputs."""
    config = tuner.active_config()
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        return _seq2seq(tuner, config, kwargs)
    batch, count = batch_size(kwargs), config.num_virtual_tokens
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = ones_before(kwargs["attention_mask"], count)
    adjust_ids(tuner, config, kwargs)
    if tuner.prompt_in_cache:
        kwargs[tuner.cache_name] = tuner.get_prompt(batch)
        return tuner.model(**kwargs)
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = tuner.word_embeddings(ids)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat((types.new_zeros(batch, count), types), dim=1)
    if config.task_type in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS) and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat((labels.new_full((batch, count), -100), labels), dim=1)
    if config.task_type == TaskType.QUESTION_ANS:
        for key in ("start_positions", "end_positions"):
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + count
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor):  # positions of the real tokens: the virtual ones come first and get none
        if keep.dtype == torch.bool:  # a (batch, n) or (n,) mask
            kwargs["logits_to_keep"] = torch.cat((keep.new_zeros(*keep.shape[:-1], count), keep), dim=-1)
        else:  # indices
            kwargs["logits_to_keep"] = keep + count
    prompts = tuner.prompts(batch).to(embeds.dtype)
    return tuner.model(inputs_embeds=torch.cat((prompts, embeds), dim=1), **kwargs)


def _seq2seq(tuner: Any, config: Any, kwargs: dict[str, Any]) -> Any:
    """PEFT's encoder-decoder forward: a prefix reaches the decoder's self-attention (its mask gains the
    virtual tokens); virtual tokens go before the encoder's input (the first ``num_virtual_tokens`` rows of
    the prompt, as PEFT uses them)."""
    batch, count = batch_size(kwargs), config.num_virtual_tokens
    adjust_ids(tuner, config, kwargs)
    if tuner.prompt_in_cache:
        if kwargs.get("decoder_attention_mask") is not None:
            kwargs["decoder_attention_mask"] = ones_before(kwargs["decoder_attention_mask"], count)
        kwargs[tuner.cache_name] = tuner.get_prompt(batch)
        return tuner.model(**kwargs)
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = tuner.word_embeddings(ids)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = ones_before(kwargs["attention_mask"], count)
    prompts = tuner.prompts(batch)[:, :count].to(embeds.dtype)
    return tuner.model(inputs_embeds=torch.cat((prompts, embeds), dim=1), **kwargs)
