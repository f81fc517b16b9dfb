"""``generate`` with a prompt, on transformers' own generation loop and KV cache.

The prompt enters at the prefill (the step whose cache is still empty): virtual tokens as embeddings before the
input ids' (the cache then holds them like any token), or a prefix written into the empty cache that
``generate`` made. At every step the 2-D attention mask gains ``num_virtual_tokens`` ones in front; with a
prefix, ``position_ids`` move past it; with virtual tokens they are dropped (the model counts positions from
the cache, as in a forward without them, PEFT's rule). An encoder-decoder model with virtual tokens needs none
of this: the encoder's input gets them once.

The hook is the model's ``prepare_inputs_for_generation``, replaced on the model object while at least one
``generate`` runs and given back after the last; what it does comes from a context variable, so calls in other
threads, and calls of the plain model (``disable_adapter()``), are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from lorakit.config import TaskType
from lorakit.errors import ConfigError
from lorakit.tuners.prompt_learning.cache import fill_cache, new_cache
from lorakit.tuners.prompt_learning.tasks import ones_before

Step = Callable[[dict[str, Any]], dict[str, Any]]
#: In this context (thread, asyncio task): model -> what its hook does to the prepared inputs.
_STEPS: ContextVar[dict[nn.Module, Step] | None] = ContextVar("lorakit_prompt_steps", default=None)
_LOCK = threading.Lock()
#: model -> [generations running, the instance attribute the hook replaced (or None)].
_HOOKED: dict[nn.Module, list[Any]] = {}


def generate(tuner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``tuner.model.generate(*args, **kwargs)`` with the active adapter's prompt (or each row's adapter's).

    Raises:
        ConfigError: no ``input_ids``, a task that does not generate, or a cache the prefix cannot go into.
    """
    config = tuner.active_config()
    if config.task_type not in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        raise ConfigError(f"generate runs CAUSAL_LM and SEQ_2_SEQ_LM adapters; this one is {config.task_type.value}")
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise ConfigError("pass generate's inputs by keyword (input_ids=..., attention_mask=...)")
        kwargs["input_ids"] = args[0]
    if kwargs.get("input_ids") is None:
        raise ConfigError("generate with a prompt-learning adapter needs input_ids (as in PEFT)")
    seq2seq = config.task_type == TaskType.SEQ_2_SEQ_LM
    if seq2seq and not tuner.prompt_in_cache:  # the encoder's input gets the virtual tokens once
        ids = kwargs.pop("input_ids")
        embeds = tuner.word_embeddings(ids)
        prompts = tuner.prompts(ids.shape[0])[:, : config.num_virtual_tokens].to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = ones_before(kwargs["attention_mask"], config.num_virtual_tokens)
        return tuner.model.generate(**kwargs)
    step = _prefix_step if tuner.prompt_in_cache else _token_step
    with _hooked(tuner.model, functools.partial(step, tuner, config, seq2seq)):
        return tuner.model.generate(**kwargs)


def _cache_of(tuner: Any, inputs: dict[str, Any]) -> tuple[str, Any]:
    name = getattr(tuner, "cache_name", None) or ("cache" if "cache" in inputs else "past_key_values")
    return name, inputs.get(name)


def _is_prefill(cache: Any) -> bool:
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


def _extend_mask(inputs: dict[str, Any], key: str, count: int) -> None:
    mask = inputs.get(key)
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ConfigError(
            "generate with a prompt-learning adapter extends the 2-D attention mask; this generation made another "
            "kind (a static or compiled cache): leave cache_implementation unset"
        )
    inputs[key] = ones_before(mask, count)


def _token_step(tuner: Any, config: Any, seq2seq: bool, inputs: dict[str, Any]) -> dict[str, Any]:
    """Virtual tokens: embeddings before the input's at the prefill; the mask covers them at every step."""
    _, cache = _cache_of(tuner, inputs)
    count = config.num_virtual_tokens
    _extend_mask(inputs, "attention_mask", count)
    for key in ("position_ids", "cache_position", "token_type_ids"):  # positions come from the cache length
        inputs.pop(key, None)
    ids = inputs.get("input_ids")
    if _is_prefill(cache) and ids is not None:
        embeds = tuner.word_embeddings(ids)
        prompts = tuner.prompts(ids.shape[0]).to(embeds.dtype)
        inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        inputs["input_ids"] = None
    return inputs


def _prefix_step(tuner: Any, config: Any, seq2seq: bool, inputs: dict[str, Any]) -> dict[str, Any]:
    """A prefix: into the empty cache at the prefill; the mask and positions account for it at every step."""
    name, cache = _cache_of(tuner, inputs)
    count = config.num_virtual_tokens
    if _is_prefill(cache):
        ids = inputs.get("decoder_input_ids" if seq2seq else "input_ids")
        if ids is None:
            ids = inputs["inputs_embeds"]
        layers = tuner.prefix_layers(ids.shape[0])
        if cache is None:  # use_cache=False: every step is a full forward with a fresh prefix
            inputs[name] = new_cache(layers, encoder_decoder=seq2seq)
        else:
            try:
                fill_cache(cache, layers)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    _extend_mask(inputs, "decoder_attention_mask" if seq2seq else "attention_mask", count)
    inputs.pop("cache_position", None)  # transformers < 5 passes it; the model counts from the cache instead
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + count
    return inputs


@contextlib.contextmanager
def _hooked(model: nn.Module, step: Step) -> Iterator[None]:
    """Inside the block, in this context only, ``model``'s prepared generation inputs go through ``step``."""
    with _LOCK:
        entry = _HOOKED.get(model)
        if entry is None:
            replaced = model.__dict__.get("prepare_inputs_for_generation")
            model.prepare_inputs_for_generation = _hook(model, model.prepare_inputs_for_generation)
            entry = _HOOKED[model] = [0, replaced]
        entry[0] += 1
    token = _STEPS.set({**(_STEPS.get() or {}), model: step})
    try:
        yield
    finally:
        _STEPS.reset(token)
        with _LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _HOOKED[model]
                if entry[1] is None:
                    model.__dict__.pop("prepare_inputs_for_generation", None)
                else:
                    model.prepare_inputs_for_generation = entry[1]


def _hook(model: nn.Module, prepare: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    @functools.wraps(prepare)
    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = prepare(*args, **kwargs)
        step = (_STEPS.get() or {}).get(model)
        return inputs if step is None else step(inputs)

    return prepare_inputs_for_generation
