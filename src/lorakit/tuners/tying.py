"""Tied input and output embeddings (``tie_word_embeddings``): which modules share the input embedding's weight, and
what an adapter that changes one of them does to the other (``ensure_weight_tying``, PEFT's rules).

A model with tied embeddings (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B, Gemma) computes its logits with the input
embedding's own ``(vocab, dim)`` weight. An adapter that trains only one side unties them in effect: the head and
the embedding no longer agree on a token. With ``ensure_weight_tying=True`` the other side gets the same change:

* ``modules_to_save`` naming the embedding or the head: the embedding gets the trainable copy, and the head's copy
  is a linear layer whose weight *is* that copy's weight;
* LoRA targeting the embedding or the head: both get a LoRA adapter, the head's factors being views of the
  embedding's (head ``A = B_embᵀ``, ``B = A_embᵀ``, so head ΔW = (embedding ΔW) in the same ``(vocab, dim)`` layout).

Trainable token rows (``trainable_token_indices``) are tied whatever ``ensure_weight_tying`` says (as in PEFT); it
only decides whether different ids for the two sides are an error. Without ``ensure_weight_tying`` a tied side in
``modules_to_save`` or ``target_modules`` only warns, as PEFT does.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple

from torch import nn

from lorakit.config import PeftConfig
from lorakit.errors import ConfigError
from lorakit.layers.base import AdapterLayer
from lorakit.tuners.lora.layer import LoraLayer

#: The names PEFT recognises as an input embedding or output head (``EMBEDDING_LAYER_NAMES``).
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def input_embedding_name(model: nn.Module, default: str = "embed_tokens") -> str:
    """The full name of ``model.get_input_embeddings()`` (PEFT's ``_get_input_embeddings_name``), else ``default``."""
    if not hasattr(model, "get_input_embeddings"):
        return default
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return default
    return next((name for name, module in model.named_modules() if name and module is embedding), default)


def _own_weight(module: nn.Module) -> Any:
    """The module's own ``weight`` parameter, looking through a lorakit layer to the module it wraps."""
    if isinstance(module, AdapterLayer):
        module = module.original()
    return module.__dict__.get("_parameters", {}).get("weight")


def tied_embedding_names(model: nn.Module) -> list[str]:
    """Full names of the modules whose weight is the input embedding's (``["lm_head"]`` for a tied LLaMA), looking
    through lorakit's layers; empty when the model's config says ``tie_word_embeddings=False`` (PEFT's
    ``_get_module_names_tied_with_embedding``, which also respects that flag)."""
    config = getattr(model, "config", None)
    if (
        config is None
        or not getattr(config, "tie_word_embeddings", False)
        or not hasattr(model, "get_input_embeddings")
    ):
        return []
    embedding = model.get_input_embeddings()
    weight = _own_weight(embedding) if embedding is not None else None
    if weight is None:
        return []
    names, inside = [], set()
    for name, module in model.named_modules():
        if not name or id(module) in inside:
            continue
        if isinstance(module, AdapterLayer):
            inside.update(id(m) for m in module.modules() if m is not module)
        if module is embedding or (isinstance(module, AdapterLayer) and module.original() is _original(embedding)):
            continue
        if _own_weight(module) is weight:
            names.append(name)
    return names


def _original(module: nn.Module) -> nn.Module:
    return module.original() if isinstance(module, AdapterLayer) else module


class TyingPlan(NamedTuple):
    """What ``ensure_weight_tying`` ties for one adapter (empty lists: nothing).

    Attributes:
        embedding: the input embedding's full name.
        modules: tied heads whose ``modules_to_save`` copy shares the embedding copy's weight.
        targets: tied heads whose LoRA factors are views of the embedding's.
    """

    embedding: str
    modules: list[str]
    targets: list[str]


def _names_embedding(selector: list[str] | str | None) -> bool:
    """Whether a ``target_modules``/``modules_to_save`` value names an embedding or output head (PEFT's test)."""
    if isinstance(selector, str):
        return any(re.fullmatch(selector, name) for name in EMBEDDING_NAMES)
    return any(entry.split(".")[-1] in EMBEDDING_NAMES for entry in selector or [])


def weight_tying_plan(model: nn.Module, config: PeftConfig, warn: bool = True) -> TyingPlan:
    """What ``config`` ties on ``model`` (PEFT's ``_check_tied_modules``), with PEFT's warnings (``warn``: the
    injection asks once, from :func:`~lorakit.tuners.modules_to_save.add_modules_to_save`).

    ``modules_to_save`` wins over ``target_modules`` when both name an embedding, as in PEFT.
    """
    none = TyingPlan(input_embedding_name(model), [], [])
    if getattr(type(config), "TIES_ITSELF", False):  # the trainable-tokens method ties its own layers
        return none
    to_save = _names_embedding(config.modules_to_save)
    targeted = _names_embedding(getattr(config, "target_modules", None))
    tokens = getattr(config, "trainable_token_indices", None) is not None
    if not (to_save or targeted or getattr(config, "ensure_weight_tying", False)):
        return none
    tied = tied_embedding_names(model)
    if not getattr(config, "ensure_weight_tying", False):
        if warn and tied and (to_save or targeted):
            fix = (
                "Set ensure_weight_tying=True to change both alike"
                if hasattr(config, "ensure_weight_tying")
                else f"{config.NAME} cannot tie them"
            )
            warnings.warn(
                "the model has tied input and output embeddings (tie_word_embeddings=True) and the adapter changes one "
                f"of them ({'modules_to_save' if to_save else 'target_modules'}), but they are not kept tied: the "
                "other keeps the base weight, so the two no longer agree (merging, or exporting to formats other "
                f"than safetensors, may then go wrong). {fix}",
                stacklevel=4,
            )
        return none
    if not tied:
        if warn:
            warnings.warn(
                "ensure_weight_tying=True but this model's input and output embeddings are not tied "
                "(tie_word_embeddings=False, or no module shares the input embedding's weight): nothing to tie",
                stacklevel=4,
            )
        return none
    if to_save:
        return none._replace(modules=tied)
    if targeted:
        return none._replace(targets=tied)
    if warn and not tokens:
        warnings.warn(
            "ensure_weight_tying=True but neither modules_to_save nor target_modules names the input embedding or the "
            "output head: there is nothing to tie",
            stacklevel=4,
        )
    return none


def is_tied_entry(entry: str, tied: list[str]) -> bool:
    """Whether a ``modules_to_save``/``target_modules`` entry names one of the ``tied`` modules (PEFT's rule)."""
    return any(re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", name) for name in tied)


def tie_lora_head(model: nn.Module, embedding: str, head: str, adapter_name: str) -> None:
    """Make the LoRA factors of ``head`` (a linear head sharing the input embedding's weight) views of the
    embedding's: ``A_head = B_embᵀ``, ``B_head = A_embᵀ`` (PEFT's ``tied_adapter``), so that the head's ΔW is the
    embedding's, in the same ``(vocab, dim)`` layout, and stays so as both train.

    Raises:
        ConfigError: the two are not a LoRA embedding and a LoRA linear layer of the same rank.
    """
    source, layer = model.get_submodule(embedding), model.get_submodule(head)
    ok = isinstance(source, LoraLayer) and isinstance(layer, LoraLayer)
    ok = ok and source.kind.containers[0] == "lora_embedding_A" and layer.kind.containers[0] == "lora_A"
    if not ok or source.r.get(adapter_name) != layer.r.get(adapter_name):
        raise ConfigError(
            f"ensure_weight_tying=True ties the LoRA adapter of {head!r} to the input embedding {embedding!r}'s, which "
            "needs LoRA on both (an embedding and a linear head) with the same rank; check rank_pattern and "
            "modules_to_save"
        )
    a, b = source.lora_embedding_A[adapter_name], source.lora_embedding_B[adapter_name]
    layer.lora_A[adapter_name].weight = nn.Parameter(b.detach().t())
    layer.lora_B[adapter_name].weight = nn.Parameter(a.detach().t())


def tied_lora_targets(model: nn.Module, config: PeftConfig, names: list[str]) -> list[str]:
    """``names`` (the modules LoRA's ``target_modules`` select) with what ``ensure_weight_tying`` adds on a tied model:
    the input embedding, and the heads tied to it last (their factors become the embedding's, :func:`tie_lora_head`;
    PEFT's ``target_modules_to_tie``)."""
    plan = weight_tying_plan(model, config, warn=False)
    if not plan.targets:
        return names
    rest = [name for name in names if name not in plan.targets and name != plan.embedding]
    return [plan.embedding, *rest, *plan.targets]


def tie_lora_targets(model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Once every layer holds the adapter: the tied heads' factors become views of the embedding's."""
    plan = weight_tying_plan(model, config, warn=False)
    for head in plan.targets:
        tie_lora_head(model, plan.embedding, head, adapter_name)
