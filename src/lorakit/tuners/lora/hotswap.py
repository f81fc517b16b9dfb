"""Hot-swapping a LoRA adapter: a new adapter's weights copied into the tensors the model already holds.

A compiled model keeps running the graphs it compiled as long as what they read keeps its identity, shape and
type: the factors A ``(r, in)`` and B ``(out, r)`` of every adapted layer, and its scaling s. A swap therefore
copies the new factors into the existing parameters (same objects, same storage: the old adapter is gone) and
writes the new s = α/r into the layer. Two things would still recompile, and
:func:`prepare_model_for_compiled_hotswap`, called once before compiling, removes both:

* s held as a Python float, which dynamo bakes into the graph: it becomes a 0-d tensor, changed in place;
* ranks that differ between adapters: every A and B is zero-padded to one ``target_rank``. Zero rows of A meet
  zero columns of B, so the output is unchanged: ``[B 0] [A; 0] = B A`` (LoRA paper §4.1, ΔW = s·BA).

A smaller rank is copied into the leading rows of A and columns of B, the rest zeroed; modules the new adapter
does not adapt get zero factors (what PEFT does). Modules it adapts that the loaded one does not, a larger rank
than the tensors hold, DoRA, a different dropout or trained biases are refused before anything changes.

PEFT's ``peft.utils.hotswap`` under the same names and arguments. This lives in LoRA's room rather than a generic
module: everything it does is about LoRA's factors, ranks and scaling (PEFT's version is LoRA-only too), and the
generic part, mapping a file's keys to the model's tensors, is :mod:`lorakit.persistence`'s, which it calls.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from typing import Any, Literal

import torch
from torch import nn

from lorakit.config import PeftConfig, PeftType, is_int, pattern_value
from lorakit.errors import AdapterFileError, ConfigError, MergeError, ShapeMismatchError
from lorakit.persistence import read_adapter, required_keys
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.delta import lora_scaling
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.model import LoraModel
from lorakit.tuners.lora.param_wrapper import ParamLoraLayer

#: Where each factor keeps its rank, for every layer kind: A ``(r, in, …)`` in dim 0, B ``(out, r, …)`` in dim 1.
RANK_DIMS = (0, 1)
#: Config fields two adapters must share: a swap cannot change them in place (a dropout module, the base's biases).
SHARED_FIELDS = ("lora_dropout", "bias")


def _tuner(model: nn.Module) -> LoraModel:
    """The LoRA tuner of a lorakit ``PeftModel`` or ``LoraModel``, also through ``torch.compile``'s wrapper."""
    inner = getattr(model, "_orig_mod", model)
    tuner = inner if isinstance(inner, BaseTuner) else getattr(inner, "base_model", None)
    if not isinstance(tuner, LoraModel):
        raise ConfigError(
            f"hot-swapping needs a lorakit PeftModel (or LoraModel) holding LoRA adapters; got {type(inner).__name__}"
        )
    return tuner


def _check_plain(tuner: LoraModel, name: str, layer: LoraLayer, adapter: str) -> None:
    config = tuner.peft_config.get(adapter)
    if config is not None and config.peft_type != PeftType.LORA:
        raise ConfigError(f"adapter {adapter!r} has peft_type={config.peft_type.value}; hot-swapping supports LORA")
    if isinstance(layer, ParamLoraLayer):  # r rows per expert: padding or copying a rank would mix experts
        raise ConfigError(
            f"adapter {adapter!r} adapts parameter {layer.parameter_name!r} of {name!r} (target_parameters); "
            "hot-swapping supports target_modules adapters only: load the adapter with load_adapter instead"
        )
    variant = layer.variant[adapter].name
    if variant != "lora":
        raise ConfigError(
            f"adapter {adapter!r} on {name!r} is a {variant} adapter (use_dora={variant == 'dora'}); hot-swapping "
            "supports plain LoRA (use_dora=False) only: load the adapter with load_adapter instead"
        )


def _alpha_for(scaling: float, rank: int, use_rslora: bool, hint: float) -> float:
    """The α that gives ``scaling`` at ``rank``: ``hint`` when it does exactly (no float noise), else s·r or s·√r."""
    if lora_scaling(hint, rank, use_rslora) == scaling:
        return hint
    return scaling * (math.sqrt(rank) if use_rslora else rank)


def _rescaled_alpha(alpha: float, r: int, rank: int, use_rslora: bool) -> float:
    """α at ``rank`` for the scaling that ``alpha`` gives at ``r`` (a factor padded from r to ``rank``)."""
    hint = alpha * (math.sqrt(rank / r) if use_rslora else rank / r)
    return _alpha_for(lora_scaling(alpha, r, use_rslora), rank, use_rslora, hint)


def _describe(tuner: LoraModel, adapter: str, config: LoraConfig) -> None:
    """Make ``config`` (the adapter's, in memory) describe the layers again: the rank their tensors hold and the
    α giving their scaling at that rank, so that ``save_pretrained`` writes a file that reloads to this model.

    Left alone when it already does; otherwise ``r``/``lora_alpha`` take the most common values and
    ``rank_pattern``/``alpha_pattern`` name every other module exactly.
    """
    held = {name: (layer.r[adapter], layer.lora_alpha[adapter]) for name, layer in _layers(tuner, adapter)}
    if not held or all(
        config.rank_for(name)[0] == r and pattern_value(config.alpha_pattern, name, config.lora_alpha) == alpha
        for name, (r, alpha) in held.items()
    ):
        return
    r0 = Counter(r for r, _ in held.values()).most_common(1)[0][0]
    alpha0 = Counter(alpha for _, alpha in held.values()).most_common(1)[0][0]
    config.r, config.lora_alpha = r0, alpha0
    config.rank_pattern = {re.escape(name): r for name, (r, _) in held.items() if r != r0}
    config.alpha_pattern = {re.escape(name): alpha for name, (_, alpha) in held.items() if alpha != alpha0}


def _layers(tuner: LoraModel, adapter: str | None = None) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of the LoRA layers holding ``adapter`` (any adapter when None)."""
    return [(n, la) for n, la in tuner.weight_layers() if (la.r if adapter is None else adapter in la.r)]


# -- configs -----------------------------------------------------------------------------------------------


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Refuse a config ``config1`` whose adapter cannot replace ``config0``'s in place.

    Both must be plain LoRA (``peft_type`` LORA, ``use_dora=False``) with equal ``lora_dropout`` and ``bias``
    (``"none"``). Ranks, α, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` may differ: the swap sets
    each layer's scaling from the new config. Targets are checked against the file's tensors, not the fields.

    Raises:
        ConfigError: naming the field, both values and what is accepted.
    """
    for config in (config0, config1):
        if config.peft_type != PeftType.LORA:
            raise ConfigError(f"peft_type={config.peft_type.value}: hot-swapping supports LORA adapters only")
        if getattr(config, "use_dora", False):
            raise ConfigError(
                "use_dora=True: hot-swapping supports plain LoRA only (use_dora=False); load a DoRA adapter with "
                "load_adapter instead"
            )
    for field in SHARED_FIELDS:
        old, new = getattr(config0, field), getattr(config1, field)
        if old != new:
            raise ConfigError(
                f"the adapters differ in {field} ({old!r} loaded, {new!r} new): a swap cannot change it in place; "
                f"accepted: the loaded adapter's {field}={old!r}"
            )
    if config1.bias != "none":
        raise ConfigError(
            f"bias={config1.bias!r}: a swap would have to replace base biases; hot-swapping accepts bias='none'"
        )


# -- preparing for compilation ------------------------------------------------------------------------------


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


@torch.no_grad()
def _pad(layer: LoraLayer, adapter: str, rank: int) -> None:
    """Zero-pad ``adapter``'s A and B on ``layer`` to ``rank`` (new parameters), keeping its scaling."""
    a, _ = layer.kind.factor_params(layer, adapter)
    r = a.shape[0]
    if r == rank:
        return
    for container, param, dim in zip(layer.kind.containers, layer.kind.factor_params(layer, adapter), RANK_DIMS):
        shape = list(param.shape)
        shape[dim] = rank
        padded = param.new_zeros(shape)
        padded.narrow(dim, 0, r).copy_(param)
        new = nn.Parameter(padded, requires_grad=param.requires_grad)
        holder = getattr(layer, container)
        if isinstance(holder, nn.ParameterDict):  # embeddings: the factors are parameters
            holder[adapter] = new
            continue
        module = holder[adapter]  # nn.Linear / nn.ConvNd: keep its repr and attributes true
        module.weight = new
        for attr in ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels"):
            if hasattr(module, attr):
                setattr(module, attr, rank)
    layer.lora_alpha[adapter] = _rescaled_alpha(layer.lora_alpha[adapter], r, rank, layer.use_rslora[adapter])
    layer.r[adapter] = rank
    layer.adapters_stamp += 1  # reshaped: caches keyed on the adapters (mixed batches) rebuild


def _cannot_pad(layer: Any) -> bool:
    """Layers whose factors :func:`_pad` does not lay out (grouped convolutions, MultiheadAttention)."""
    base = layer.base_layer
    return isinstance(base, nn.MultiheadAttention) or getattr(base, "groups", 1) > 1


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Prepare a model holding its first adapter(s) so that, once compiled, swaps never recompile.

    Every LoRA adapter's scaling becomes a 0-d tensor (on its factors' device), and with ``target_rank`` every A
    ``(r, in)`` and B ``(out, r)`` is zero-padded to ``(target_rank, in)`` and ``(out, target_rank)``: the output
    is unchanged (``[B 0] [A; 0] = B A``). Each layer's ``r`` becomes ``target_rank`` and its ``lora_alpha`` the
    value giving the same scaling at that rank; the model's configs are rewritten to match (a save reloads to the
    same model). Call it after loading the first adapter and before ``torch.compile``.

    Args:
        target_rank: the largest rank of any adapter that will be swapped in (None: ranks unchanged).
        config: configs to update as PEFT does (``r`` and ``rank_pattern`` values set to ``target_rank``); the
            model's own configs are always kept true, so pass this only for configs the model does not hold.
        check_compiled: what to do when the model is already compiled: ``"error"``, ``"warn"`` or ``"ignore"``.

    Raises:
        ConfigError: the model holds no LoRA adapter, holds a DoRA (or non-LoRA) adapter, is already compiled
            (``check_compiled="error"``), or an argument is invalid.
        ShapeMismatchError: an adapter's rank is above ``target_rank``. The model is unchanged on every error.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ConfigError(f"check_compiled={check_compiled!r} is invalid; accepted: 'error', 'warn', 'ignore'")
    if _is_compiled(model):
        message = "prepare_model_for_compiled_hotswap was called on a compiled model; call it before torch.compile"
        if check_compiled == "error":
            raise ConfigError(message)
        if check_compiled == "warn":
            warnings.warn(message + " (the next call recompiles)", stacklevel=2)
    tuner = _tuner(model)
    held = [(name, layer, adapter) for name, layer in _layers(tuner) for adapter in layer.r]
    if not held:
        raise ConfigError("the model holds no LoRA adapter: load the first adapter, then prepare, then compile")
    for name, layer, adapter in held:
        _check_plain(tuner, name, layer, adapter)
    if target_rank is not None:
        if not is_int(target_rank) or target_rank < 1:
            raise ConfigError(f"target_rank={target_rank!r} is invalid; accepted: a positive integer or None")
        above = [(name, adapter, layer.r[adapter]) for name, layer, adapter in held if layer.r[adapter] > target_rank]
        if above:
            name, adapter, r = above[0]
            raise ShapeMismatchError(
                f"target_rank={target_rank} is below the rank of adapter {adapter!r} on {name!r} (r={r}); accepted: "
                f"target_rank >= {max(r for *_, r in above)}, the largest rank of any adapter to be swapped in"
            )
        unpaddable = [(name, type(layer.base_layer).__name__) for name, layer, _ in held if _cannot_pad(layer)]
        if unpaddable:
            raise ConfigError(
                f"target_rank cannot pad the adapter on {unpaddable[0][0]!r} ({unpaddable[0][1]}): rank "
                "padding covers linear, Conv1D, embedding and ungrouped convolution layers, not grouped "
                "convolutions (B's grouped channels) or nn.MultiheadAttention (its out_proj factors); swap adapters "
                "of one rank there and leave target_rank=None"
            )
    for _, layer, adapter in held:
        if target_rank is not None:
            _pad(layer, adapter, target_rank)
        scaling = layer.scaling[adapter]
        if not isinstance(scaling, torch.Tensor):
            device = layer.kind.factor_params(layer, adapter)[0].device
            layer.scaling[adapter] = torch.tensor(float(scaling), device=device)
    for adapter in dict.fromkeys(adapter for *_, adapter in held):
        if adapter in tuner.peft_config:
            _describe(tuner, adapter, tuner.peft_config[adapter])
    if config is None or target_rank is None:
        return
    own = {id(c) for c in tuner.peft_config.values()}
    for given in config.values() if isinstance(config, dict) else [config]:
        if id(given) not in own:  # PEFT's update, for configs the model does not hold
            given.r = target_rank
            given.rank_pattern = dict.fromkeys(given.rank_pattern, target_rank)


# -- swapping ------------------------------------------------------------------------------------------------


def _plan(
    model: nn.Module, tuner: LoraModel, adapter: str, state: dict[str, torch.Tensor], config: LoraConfig
) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None, int | None]], dict[LoraLayer, tuple[int, float]]]:
    """What the swap writes: ``(destination, source or None for zeros, rank dim or None)`` per tensor, and the new
    ``(r, α)`` per layer the file adapts. Every check happens here, before anything is written."""
    live = required_keys(tuner, adapter, loading=True)  # file key -> the model's tensor: persistence's mapping
    key_of = {id(t): k for k, t in live.items()}
    named = dict(getattr(model, "_orig_mod", model).named_parameters(remove_duplicate=False))
    factors = {}  # id of a factor -> (module name, layer, rank dim)
    for name, layer in _layers(tuner, adapter):
        for param, dim in zip(layer.kind.factor_params(layer, adapter), RANK_DIMS):
            factors[id(param)] = (name, layer, dim)
    source: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():  # file keys, or (PEFT's low-level form) the model's state-dict keys
        param = named.get(key.removeprefix("_orig_mod."))
        file_key = key if key in live else key_of.get(id(param)) if param is not None else None
        if file_key is None:
            unexpected.append(key)
        else:
            source[file_key] = tensor
    if unexpected:
        raise ConfigError(
            f"the new adapter holds {len(unexpected)} tensors adapter {adapter!r} has no place for, first "
            f"{unexpected[0]!r}: it adapts (target_modules) or saves (modules_to_save) modules the loaded adapter does "
            "not. A swap cannot add layers; accepted: the loaded adapter's modules or fewer (load_adapter otherwise)"
        )
    copies: list[tuple[torch.Tensor, torch.Tensor | None, int | None]] = []
    forms: dict[LoraLayer, tuple[int, float]] = {}
    for key, dest in live.items():
        src, (name, layer, dim) = source.get(key), factors.get(id(dest), (None, None, None))
        if layer is None:  # a modules_to_save copy: replaced whole
            if src is None:
                raise AdapterFileError(f"the new adapter lacks {key!r}, which adapter {adapter!r} needs (its copy)")
            if tuple(src.shape) != tuple(dest.shape):
                raise ShapeMismatchError(f"{key!r} has shape {tuple(src.shape)}; the model holds {tuple(dest.shape)}")
        elif src is not None:
            _check_factor(key, src, dest, dim, adapter)
            r = config.rank_for(name)[0]
            if src.shape[dim] != r:
                raise ShapeMismatchError(
                    f"{key!r} holds rank {src.shape[dim]} but the new adapter's config gives {name!r} rank {r} "
                    "(r / rank_pattern); the config and the weights do not belong together"
                )
            forms[layer] = (r, pattern_value(config.alpha_pattern, name, config.lora_alpha))
        copies.append((dest, src, dim))
    found = Counter(factors[id(dest)][0] for dest, src, dim in copies if dim is not None and src is not None)
    half = next((name for name, n in found.items() if n != len(RANK_DIMS)), None)
    if half is not None:
        raise AdapterFileError(f"the new adapter holds only one of lora_A and lora_B for {half!r}; it needs both")
    return copies, forms


def _check_factor(key: str, src: torch.Tensor, dest: torch.Tensor, dim: int, adapter: str) -> None:
    """A factor fits when its rank is at most the held one and every other dimension is equal."""
    rank, held = (src.shape[dim], dest.shape[dim]) if src.dim() == dest.dim() else (None, None)
    if rank is not None and rank > held:
        raise ShapeMismatchError(
            f"{key!r} has rank {rank} but adapter {adapter!r} holds rank {held} there: a swap cannot grow a tensor. "
            f"Accepted: r <= {held}, or call prepare_model_for_compiled_hotswap(model, target_rank={rank}) (or "
            "more) before compiling"
        )
    others = [(s, d) for i, (s, d) in enumerate(zip(src.shape, dest.shape)) if i != dim]
    if rank is None or any(s != d for s, d in others):
        raise ShapeMismatchError(
            f"{key!r} has shape {tuple(src.shape)}; the model holds {tuple(dest.shape)} (only the rank, dim {dim}, "
            "may be smaller): was the adapter trained on another base model?"
        )


def _set_scaling(layer: LoraLayer, adapter: str, scaling: float) -> None:
    """Write s in place when it is a tensor (a compiled graph reads it), else replace the float."""
    held = layer.scaling[adapter]
    if isinstance(held, torch.Tensor):
        with torch.no_grad():
            held.fill_(scaling)
    else:
        layer.scaling[adapter] = scaling


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: LoraConfig,
    parameter_prefix: str = "lora_",
) -> None:
    """Replace adapter ``adapter_name``'s weights by ``state_dict``'s, in place (see the module docstring).

    Args:
        model: a lorakit ``PeftModel`` or ``LoraModel`` holding ``adapter_name`` (compiled or not).
        state_dict: the new adapter's tensors, keyed as in its file (``base_model.model.<module>.lora_A.weight``)
            or as in ``model.state_dict()`` (with the adapter name, PEFT's form).
        config: the new adapter's config: its r, α, patterns and ``use_rslora`` give each layer's scaling.
        parameter_prefix: PEFT's argument; ``"lora_"`` is the one accepted.

    Raises:
        AdapterNotFoundError: no adapter of that name. MergeError: the adapter is merged (unmerge first).
        ConfigError: incompatible configs (:func:`check_hotswap_configs_compatible`) or modules the loaded adapter
            does not adapt. ShapeMismatchError: a rank above the held one, or other shapes that differ.
        AdapterFileError: a ``modules_to_save`` copy missing. On every error the model is unchanged.
    """
    tuner = _tuner(model)
    tuner._check_adapter(adapter_name)
    if parameter_prefix != LoraConfig.FILE_PREFIX:
        raise ConfigError(f"parameter_prefix={parameter_prefix!r}; hot-swapping LoRA accepts 'lora_'")
    check_hotswap_configs_compatible(tuner.peft_config[adapter_name], config)
    layers = _layers(tuner, adapter_name)
    for name, layer in layers:
        _check_plain(tuner, name, layer, adapter_name)
        if adapter_name in layer.merged_adapters:
            raise MergeError(
                f"adapter {adapter_name!r} is merged into {name!r}; call unmerge_adapter() before hot-swapping it"
            )
    copies, forms = _plan(model, tuner, adapter_name, state_dict, config)
    with torch.no_grad():
        for dest, src, dim in copies:
            if src is None:  # a module the new adapter does not adapt: it adds nothing (PEFT zeroes it too)
                dest.zero_()
            elif dim is None or src.shape == dest.shape:
                dest.copy_(src)
            else:  # a smaller rank: the leading rows of A / columns of B, zeros after
                dest.zero_()
                dest.narrow(dim, 0, src.shape[dim]).copy_(src)
    rslora = config.use_rslora
    for _, layer in layers:
        held = layer.r[adapter_name]
        if layer in forms:
            r, alpha = forms[layer]
            _set_scaling(layer, adapter_name, lora_scaling(alpha, r, rslora))
            layer.lora_alpha[adapter_name] = _rescaled_alpha(alpha, r, held, rslora)
        else:  # zeroed: keep its scaling, described under the new use_rslora
            scaling = float(layer.scaling[adapter_name])
            layer.lora_alpha[adapter_name] = _alpha_for(scaling, held, rslora, layer.lora_alpha[adapter_name])
        layer.use_rslora[adapter_name] = rslora
    own = tuner.peft_config[adapter_name]
    own.use_rslora = rslora
    _describe(tuner, adapter_name, own)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str,
    torch_device: str | None = None,
    **kwargs: Any,
) -> None:
    """Replace adapter ``adapter_name`` by the adapter saved in ``model_name_or_path`` (PEFT's format), in place.

    The name stays; the weights, α and r are the new adapter's. On a model prepared with
    :func:`prepare_model_for_compiled_hotswap` and then compiled, no swap recompiles::

        model = PeftModel.from_pretrained(base, "adapter-0")
        prepare_model_for_compiled_hotswap(model, target_rank=16)   # the largest rank to come
        model = torch.compile(model)
        hotswap_adapter(model, "adapter-1", adapter_name="default")

    Args:
        model: a lorakit ``PeftModel`` (or its ``torch.compile`` wrapper) holding ``adapter_name``.
        model_name_or_path: the adapter folder, read with :func:`lorakit.persistence.read_adapter` (safetensors
            and JSON, no pickle).
        torch_device: accepted for PEFT's signature; tensors are copied onto the device of the ones they replace.
        kwargs: ``subfolder`` (the adapter inside the folder); PEFT's hub arguments are ignored (lorakit is offline).

    Raises:
        See :func:`hotswap_adapter_from_state_dict`; AdapterFileError and ConfigError also for unreadable files.
    """
    tuner = _tuner(model)
    tuner._check_adapter(adapter_name)
    config, state = read_adapter(model_name_or_path, subfolder=kwargs.get("subfolder"))
    hotswap_adapter_from_state_dict(model, state, adapter_name, config)
