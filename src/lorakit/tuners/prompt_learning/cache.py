"""A prefix as transformers' key/value cache: the layout PEFT gives it (Li & Liang 2021, arXiv 2101.00190, §4.2:
each layer's activations attend to the prefix as to earlier tokens) in the installed transformers' cache classes.

The model receives the prefix through its cache argument, ``cache`` in transformers 5 and ``past_key_values``
before (:func:`cache_argument`); ``generate`` fills its own empty cache with it (:func:`fill_cache`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def prefix_layers(prefix: torch.Tensor, config: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a prefix into each layer's keys and values.

    Args:
        prefix: ``(batch, num_virtual_tokens, num_layers * 2 * token_dim)``, PEFT's layout (layer-major, then
            key/value, then heads).
        config: the adapter's config (``num_layers``, ``num_attention_heads``, ``token_dim``).

    Returns:
        ``num_layers`` pairs ``(keys, values)``, each ``(batch, heads, num_virtual_tokens, head_dim)``. For an
        encoder-decoder model (``num_transformer_submodules == 2``) decoder layer i gets the pair stored for layer
        ``2i mod num_layers``: PEFT stacks the prefix twice and regroups it four tensors per layer, keeping the first
        two as the layer's self-attention prefix; files are only compatible when read the same way.
    """
    batch, tokens = prefix.shape[:2]
    layers, heads = config.num_layers, config.num_attention_heads
    kv = prefix.reshape(batch, tokens, layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(2, 0, 3, 1, 4)  # (layers * 2, batch, heads, tokens, head_dim)
    step = config.num_transformer_submodules or 1
    return [(kv[2 * (step * i % layers)], kv[2 * (step * i % layers) + 1]) for i in range(layers)]


def new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], encoder_decoder: bool) -> Any:
    """A cache holding the prefix: ``DynamicCache``, or for an encoder-decoder model an ``EncoderDecoderCache``
    whose decoder self-attention holds it and whose cross-attention cache is empty (as PEFT builds it)."""
    from transformers import DynamicCache, EncoderDecoderCache

    cache = DynamicCache()
    fill_cache(cache, layers)
    if encoder_decoder:
        cache = EncoderDecoderCache(cache, DynamicCache())
    return cache


def fill_cache(cache: Any, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the prefix into an empty cache, in place (the one ``generate`` made; its type is kept).

    Raises:
        ValueError: a cache that already holds tokens, or of a kind lorakit cannot prefill (a static cache).
    """
    from transformers import DynamicCache, EncoderDecoderCache

    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if not isinstance(target, DynamicCache):
        raise ValueError(
            f"prefix tuning fills a DynamicCache with its prefix; this generation uses a {type(target).__name__} "
            "(cache_implementation): leave cache_implementation unset"
        )
    if target.get_seq_length():
        raise ValueError("the cache already holds tokens; a prefix goes into an empty cache only")
    for index, (keys, values) in enumerate(layers):
        target.update(keys, values, index)


def cache_argument(model: nn.Module) -> str | None:
    """The name under which ``model``'s forward takes a key/value cache: ``cache`` (transformers 5),
    ``past_key_values`` (before), or None when it takes none.

    A head model whose forward passes ``**kwargs`` to its backbone (``BertForSequenceClassification``) takes the
    backbone's name.
    """
    params = _parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        inner = _parameters(backbone)
        for name in ("cache", "past_key_values"):
            if name in inner:
                return name
    return None


def _parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}
