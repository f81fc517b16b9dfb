"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv 2410.07170): a data-driven start for LoRA.

For every adapted linear layer with input features d (§3 of the paper):

1. Collect its inputs on a few batches of the training data, ``X (tokens, d)`` per batch (padding and, with
   ``use_label_mask``, prompt positions left out), and fold them into an incremental PCA
   (:class:`~lorakit.tuners.lora.ipca.IncrementalPCA`) with ``k = round(r · rho)`` components.
2. Stop collecting for a layer once its components are stable: the cosine similarity of each needed component
   before and after a batch is ≥ ``tau``.
3. Redistribute the ranks: the budget is the sum of the configured ranks; the largest explained-variance ratios
   across all layers win, a layer getting at most k of them (``rho = 1`` keeps every rank as configured).
4. Start ``A (r_i, d)`` at the layer's top ``r_i`` right-singular vectors (``whiten``: each divided by the square
   root of its singular value), B at zero, so the model starts exactly at the base. A layer given rank 0 loses
   its adapter; with ``adjust_scaling_factors`` α becomes ``α · r_i / r`` so the scaling α/r is unchanged.

Layers that receive the same input (q, k and v of an attention block) share one PCA. The new ranks and alphas
go into ``rank_pattern`` / ``alpha_pattern`` and ``target_modules`` of the adapter's config, as in PEFT, so the
saved adapter reloads (in lorakit or PEFT) without running EVA again.

Usage (PEFT's API)::

    config = LoraConfig(r=16, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    model = get_peft_model(base, config)
    initialize_lora_eva_weights(model, dataloader)   # batches of {"input_ids", "attention_mask"[, "labels"]}
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.config import pattern_value
from lorakit.errors import ConfigError, DataError, MergeError
from lorakit.layers.kinds import HFConv1D, LinearKind
from lorakit.targeting import select_targets
from lorakit.tuners.base import BaseTuner, _parent
from lorakit.tuners.lora.eva_collect import first_tensor, svd_of_layer_inputs
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.subconfigs import EvaConfig

__all__ = [
    "EvaConfig",
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
]

#: With at least this many adapted modules, the new ``target_modules`` is shortened to distinguishing suffixes.
_MIN_TARGETS_TO_SHORTEN = 20
_PEFT_PREFIX = "base_model.model."


# -- what the user can swap: how the model runs and which rows of a layer's input count ---------------------


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """Run one batch: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, Any], peft_config: Any) -> torch.Tensor:
    """The ``(n, 2)`` (batch, position) indices of the tokens that count: not padding (``attention_mask``) and, with
    ``eva_config.use_label_mask``, not ``label_mask_value`` in ``labels`` (prompt tokens)."""
    if not isinstance(model_input, Mapping):
        raise DataError(
            f"EVA's default input preparation needs batches that are dicts (input_ids, attention_mask, labels), "
            f"got {type(model_input).__name__}; pass prepare_model_inputs_fn=None or your own"
        )
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str):
    """The rows of a layer's input ``(batch, seq, d)`` at the indices of
    :func:`prepare_model_inputs_fn_language_modeling`: ``(n, d)``."""
    return first_tensor(layer_input, layer_name)[model_input.T.unbind()]


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """Steps 1–3 of EVA: ``{module name: A₀ (r_i, d)}`` for every layer with a non-zero new rank r_i.

    Args:
        model: a lorakit model with a LoRA adapter (names as in ``model.named_modules()``, adapters disabled while
            the data runs) or a plain model (then ``peft_config`` says which linears).
        dataloader: sized iterable of batches, cycled until every layer has converged.
        peft_config: the :class:`~lorakit.LoraConfig` (default: the adapter's own).
        forward_fn: ``(model, batch) -> Any``, runs one batch (default ``model(**batch)``).
        prepare_model_inputs_fn: ``(batch, peft_config) -> anything``, passed to ``prepare_layer_inputs_fn`` as
            ``model_input`` (default: the indices of the tokens that count); None passes a copy of the batch.
        prepare_layer_inputs_fn: ``(layer_input, model_input, layer_name) -> (n, d)``, or a dict of them by module
            name; None uses every row of the input.
        gather_distributed_inputs: under ``torch.distributed``, fold every rank's rows into each PCA.
        show_progress_bar: a tqdm bar of converged layers.

    Raises:
        ConfigError: no config, or names in a ``prepare_layer_inputs_fn`` dict that are not EVA's layers.
        DataError: an empty dataloader, or a layer that got fewer rows than components in a whole pass.
    """
    tuner = _tuner(model)
    if peft_config is None:
        if tuner is None:
            raise ConfigError("get_eva_state_dict needs peft_config when the model is not a lorakit model")
        peft_config = model.peft_config[adapter_name]
    if getattr(peft_config, "eva_config", None) is None:
        peft_config = copy.copy(peft_config)
        peft_config.eva_config = EvaConfig()
    if len(dataloader) == 0:
        raise DataError("the dataloader given to EVA is empty")
    if gather_distributed_inputs and dist.is_available() and dist.is_initialized():
        warnings.warn(
            "EVA gathers every rank's layer inputs (gather_distributed_inputs=True): give each rank different batches",
            stacklevel=2,
        )
    disabled = nullcontext()
    if tuner is not None:
        disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else tuner.adapters_disabled()
    with disabled:
        return svd_of_layer_inputs(
            model,
            dataloader,
            peft_config,
            _eva_targets(model, peft_config, adapter_name),
            forward_fn or forward_fn_dict,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            gather_distributed_inputs,
            show_progress_bar,
        )


def _tuner(model: nn.Module) -> BaseTuner | None:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, BaseTuner) else model if isinstance(model, BaseTuner) else None


def _eva_targets(model: nn.Module, config: Any, adapter_name: str) -> list[str]:
    """Names (in ``model``) of the layers EVA initialises: linear LoRA layers holding the adapter on a lorakit
    model; on a plain model, the linear modules ``config`` selects."""
    if _tuner(model) is not None:
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and isinstance(m.kind, LinearKind) and adapter_name in m.r
        ]
    linear = (nn.Linear,) if HFConv1D is None else (nn.Linear, HFConv1D)
    return [n for n in select_targets(model, config) if isinstance(model.get_submodule(n), linear)]


# -- step 4: the adapter's A, and the config that reloads it ------------------------------------------------


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Give the EVA adapter ``adapter_name`` of ``model`` its data-driven start (steps 1–4), in place.

    Every linear LoRA layer of the adapter gets ``A`` from ``eva_state_dict`` (computed from ``dataloader`` with
    :func:`get_eva_state_dict` when not given; its keys may be ``model``'s module names or the base model's) and
    ``B = 0``; a layer whose rank changed is rebuilt at the new rank, one given rank 0 loses the adapter, and the
    adapter's config gets the new ``rank_pattern``, ``alpha_pattern`` and ``target_modules``. Layers the state
    dict does not cover keep their default start (warned).

    Other arguments: as :func:`get_eva_state_dict`.

    Returns:
        ``model``.

    Raises:
        ConfigError: ``model`` is not a lorakit LoRA model, has several active adapters, or the adapter's
            ``init_lora_weights`` is not ``"eva"``; neither ``dataloader`` nor ``eva_state_dict`` is given.
        MergeError: the adapter is merged.
    """
    tuner = _tuner(model)
    if tuner is None or not hasattr(model, "peft_config"):
        raise ConfigError(f"initialize_lora_eva_weights needs a lorakit model (get_peft_model), got {type(model)}")
    if len(model.active_adapters) > 1:
        raise ConfigError(
            f"initialize_lora_eva_weights works with one active adapter, the model has {model.active_adapters}"
        )
    tuner._check_adapter(adapter_name)
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights needs init_lora_weights='eva', adapter {adapter_name!r} has "
            f"{model.peft_config[adapter_name].init_lora_weights!r}"
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    _load_eva_state_dict(model, tuner, eva_state_dict, adapter_name)
    return model


def _relative_names(model: nn.Module, tuner: BaseTuner) -> str:
    """The prefix of the base model's module names inside ``model`` (``"base_model.model."`` for a PeftModel)."""
    for name, module in model.named_modules():
        if module is tuner.model:
            return f"{name}." if name else ""
    return ""


def _load_eva_state_dict(model: nn.Module, tuner: BaseTuner, eva_state_dict: dict, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    prefix = _relative_names(model, tuner)
    state = {k.removeprefix(prefix).removeprefix(_PEFT_PREFIX): v for k, v in eva_state_dict.items()}
    modules = list(tuner.model.named_modules())
    merged = [n for n, m in modules if isinstance(m, LoraLayer) and adapter_name in m.merged_adapters]
    if merged:
        raise MergeError(f"adapter {adapter_name!r} is merged (in {merged[0]!r}); unmerge it before initialising it")
    targets, missing, others, removed = [], [], [], []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in modules:
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            others.append(name)
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        if name not in state:  # PEFT's fallback: the default start
            layer.kind.init_factors(layer, adapter_name, True)
            missing.append(name)
            new_rank = r
        else:
            a0 = state.pop(name)
            new_rank = a0.shape[0]
            if new_rank == 0:
                _drop_adapter(tuner, name, layer, adapter_name)
                removed.append(name)
                continue
            if new_rank != r and eva.adjust_scaling_factors:
                alpha *= new_rank / r
            if new_rank != layer.r[adapter_name] or alpha != layer.lora_alpha[adapter_name]:
                _rebuild_adapter(tuner, name, layer, adapter_name, config, new_rank, alpha)
            a, b = layer.kind.factor_params(layer, adapter_name)
            a.copy_(a0.to(device=a.device, dtype=a.dtype))
            b.zero_()
            targets.append(name)
        if new_rank != config.r:
            rank_pattern[name] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    tuner._structure_changed()
    targets += missing
    if len(targets) >= _MIN_TARGETS_TO_SHORTEN:
        targets = _distinguishing_suffixes(targets, others + removed)
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(
            f"EVA found no components for {missing} (only linear layers are supported): they keep "
            "init_lora_weights=True's start",
            stacklevel=3,
        )


def _drop_adapter(tuner: BaseTuner, name: str, layer: LoraLayer, adapter_name: str) -> None:
    """Rank 0: the layer loses the adapter, and gives its place back to its base layer when it holds no other."""
    layer.delete(adapter_name)
    if not layer.adapter_names():
        parent, child = _parent(tuner.model, name)
        setattr(parent, child, layer.original())


def _rebuild_adapter(
    tuner: BaseTuner, name: str, layer: LoraLayer, adapter_name: str, config: Any, r: int, alpha: float
) -> None:
    """The adapter again at rank ``r`` and alpha ``alpha`` (everything else as the config says), its parameters'
    ``requires_grad`` as before."""
    trainable = layer.kind.factor_params(layer, adapter_name)[0].requires_grad
    layer.delete(adapter_name)
    # a pattern keyed by this module's own (escaped) name gives it exactly (r, alpha)
    key = name.replace(".", r"\.")
    one = copy.copy(config)
    one.rank_pattern, one.alpha_pattern = {key: r}, {key: alpha}
    tuner._create_and_replace((name, layer, layer.kind), adapter_name, one)
    for param in layer.adapter_parameters(adapter_name):
        param.requires_grad_(trainable)


def _distinguishing_suffixes(targets: list[str], others: list[str]) -> list[str]:
    """A short list of name suffixes that selects exactly ``targets`` among the model's modules (PEFT shortens
    long target lists the same way): for each target, its shortest suffix that is no other module's suffix."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for other in others for s in suffixes(other)}
    chosen: list[str] = []
    for name, candidates in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda item: item[1]):
        if any(name == c or name.endswith("." + c) for c in chosen):
            continue
        chosen.append(next((s for s in candidates if s not in taken), name))
    return sorted(chosen)
