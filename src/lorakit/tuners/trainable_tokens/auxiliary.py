"""LoRA's ``trainable_token_indices``: token rows trained beside the adapter, in
:class:`~lorakit.tuners.trainable_tokens.layer.TrainableTokensWrapper` modules (PEFT's
``set_additional_trainable_modules``, same rules and file keys).

``trainable_token_indices=[ids]`` trains those rows of the input embedding; ``{name: [ids]}`` names the modules
(a module matches when its full name ends with the name, as ``modules_to_save`` entries do). When the output head
shares the embedding's weight (``tie_word_embeddings``), it reads the embedding's rows (a tied wrapper, saved
once, under the embedding's name). Giving the head its own ids too is accepted when they equal the embedding's (one
set of rows, tied) or, with ``ensure_weight_tying=False``, when they differ (two independent sets, untied);
different ids with ``ensure_weight_tying=True`` are an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.config import PeftConfig
from lorakit.errors import ConfigError, suggest
from lorakit.layers.base import ActiveAdapters, AdapterLayer
from lorakit.tuners.modules_to_save import inside_adapter_layer
from lorakit.tuners.trainable_tokens.layer import TrainableTokensWrapper
from lorakit.tuners.tying import input_embedding_name, tied_embedding_names


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _token_groups(model: nn.Module, config: PeftConfig) -> dict[str, list[int]]:
    """``{module name (suffix): ids}`` from ``trainable_token_indices`` (a list: the input embedding's)."""
    indices = config.trainable_token_indices
    if isinstance(indices, dict):
        return {key: list(ids) for key, ids in indices.items()}
    return {input_embedding_name(model): list(indices)}


def _tied_groups(model: nn.Module, groups: dict[str, list[int]], tied: list[str], ensure: bool) -> tuple[bool, set]:
    """``(mismatch, keys to skip)``: whether the embedding and a tied head were given different ids, and the head
    keys whose (equal) ids the tie covers (PEFT's rules).

    Raises:
        ConfigError: different ids with ``ensure_weight_tying=True``.
    """
    if len(groups) < 2 or not tied:
        return False, set()
    embedding = input_embedding_name(model)
    keys = [
        key for key in groups if embedding.endswith(key) or any(t.endswith(key) or key in t.split(".") for t in tied)
    ]
    if len(keys) < 2:
        return False, set()
    mismatch = any(groups[key] != groups[keys[0]] for key in keys[1:])
    if mismatch and ensure:
        listed = ", ".join(f"{key}: {groups[key]}" for key in keys)
        raise ConfigError(
            f"trainable_token_indices gives tied modules different token ids ({listed}) and ensure_weight_tying=True "
            "keeps them tied, so they must train the same rows: give the same ids, only the embedding's, or set "
            "ensure_weight_tying=False to train two independent sets"
        )
    return mismatch, set() if mismatch else set(keys) & set(tied)


def add_trainable_tokens(
    model: nn.Module,
    active: ActiveAdapters,
    adapter_name: str,
    config: PeftConfig,
    dtype_for: Callable[[AdapterLayer], torch.dtype],
) -> None:
    """Give ``adapter_name`` the token rows ``config.trainable_token_indices`` asks for; new wrappers follow
    ``active``. ``dtype_for(wrapper)`` is the dtype of the rows (the tuner's adapter dtype).

    Raises:
        ConfigError: a module both in ``modules_to_save`` and given token ids; a key that matches no module; a
            module that is not an embedding or a linear head, or that another adapter layer already holds; ids
            outside the vocabulary or repeated; different ids for tied modules with ``ensure_weight_tying``. The
            caller (:meth:`~lorakit.tuners.base.BaseTuner.inject`) undoes what was added.
    """
    if getattr(config, "trainable_token_indices", None) is None:
        return
    groups = _token_groups(model, config)
    for key in groups:
        if key in (config.modules_to_save or []):
            raise ConfigError(
                f"{key!r} is in modules_to_save (trained in full) and in trainable_token_indices (some rows trained); "
                f"choose one: modules_to_save=[..., {key!r}, ...] or trainable_token_indices={{{key!r}: [...]}}"
            )
    tied = tied_embedding_names(model)
    ensure = bool(getattr(config, "ensure_weight_tying", False))
    mismatch, skip = _tied_groups(model, groups, tied, ensure)
    for key, ids in groups.items():
        if key not in skip:
            _add_rows(model, active, adapter_name, key, ids, dtype_for)
    source = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if (
        tied
        and isinstance(source, TrainableTokensWrapper)
        and adapter_name in source.adapter_names()
        and (ensure or not mismatch)
    ):
        for name in tied:
            tie_head(model, active, name, source, TrainableTokensWrapper)


def _add_rows(
    model: nn.Module,
    active: ActiveAdapters,
    adapter_name: str,
    key: str,
    ids: list[int],
    dtype_for: Callable[[AdapterLayer], torch.dtype],
) -> None:
    names = [n for n, _ in model.named_modules() if n and n.endswith(key) and not inside_adapter_layer(model, n)]
    if not names:
        raise ConfigError(
            f"trainable_token_indices key {key!r} matched no module; give the name (or name ending) of an embedding "
            "layer, e.g. 'embed_tokens'" + suggest(key, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        )
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensWrapper):
            wrapper = module
        elif isinstance(module, AdapterLayer):
            raise ConfigError(
                f"trainable_token_indices names {name!r}, which already holds a {type(module).__name__} (the adapter "
                "targets it, or modules_to_save copies it); train its token rows or adapt it, not both"
            )
        else:
            wrapper = TrainableTokensWrapper(module, where=name)
            wrapper.follow(active)
            _put(model, name, wrapper)
        wrapper.add(adapter_name, ids, True, dtype_for(wrapper), name)


def tie_head(
    model: nn.Module, active: ActiveAdapters, name: str, source: AdapterLayer, layer_type: type[AdapterLayer]
) -> None:
    """Make module ``name`` (a head sharing the input embedding's weight) read ``source``'s token rows, with a
    ``layer_type`` layer tied to it (nothing to do if it is one already).

    Raises:
        ConfigError: the head is another adapter layer, or has token rows of its own.
    """
    module = model.get_submodule(name)
    if isinstance(module, layer_type) and module.rows.tied_to is source.rows:
        return
    if isinstance(module, AdapterLayer):
        own = isinstance(module, layer_type)
        raise ConfigError(
            f"{name!r} shares the input embedding's weight, whose token rows train, so it must read the same rows; but "
            + ("it trains token rows of its own" if own else f"it already holds a {type(module).__name__}")
            + ". Train the head's tokens through the embedding's ids only, or untie the model (tie_word_embeddings="
            "False)"
        )
    follower = layer_type(module, tied_to=source, where=name)
    follower.follow(active)
    _put(model, name, follower)
