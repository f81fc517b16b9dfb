"""PEFT's functions for adapters by hand, for code that holds a plain model or a state dict rather than a
``PeftModel`` (transformers' and diffusers' integrations, custom training loops): :func:`inject_adapter_in_model`,
:func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict`, :func:`get_base_model_state_dict` /
:func:`set_base_model_state_dict`, :func:`load_peft_weights`, and the ``key_mapping`` of loads (:func:`remap_keys`).

Names, arguments and results are PEFT 0.21's. Each function takes a :class:`~lorakit.PeftModel` (keys as in its
adapter files, ``base_model.model.<module path>.<tensor>``), a weight method's tuner (``model.<...>``) or a plain
model given adapters by :func:`inject_adapter_in_model` (keys relative to it, ``<module path>.<tensor>``). The
tensors are found through the adapter layers (:mod:`lorakit.persistence`), never by searching names.

Where lorakit is stricter than PEFT, on purpose: a state dict may only set what the adapter owns (a key naming a base
weight is refused, :class:`~lorakit.errors.AdapterFileError`), every check runs before anything is written, and a
shape that does not fit is an error unless ``ignore_mismatched_sizes=True``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.config import PeftConfig, method_for
from lorakit.errors import AdapterExistsError, ConfigError, ShapeMismatchError
from lorakit.io import hub_options
from lorakit.layers import AdapterLayer
from lorakit.persistence import (
    KEY_PREFIX,
    adapter_tensors,
    copy_adapter_state,
    match_adapter_state,
    read_adapter_weights,
)
from lorakit.targeting import select_targets
from lorakit.tuners.base import BaseTuner, Tuner

#: Where :func:`inject_adapter_in_model` keeps the tuner of a plain model (in ``__dict__``, not as a submodule, so
#: the model's state dict and parameters are unchanged).
_TUNER = "_lorakit_tuner"


def _resolve(model: nn.Module) -> tuple[Tuner, str]:
    """The tuner holding ``model``'s adapters, and the prefix that ``model``'s keys have where the adapter files'
    keys have the tuner's file prefix (``base_model.model.``): the same for a PeftModel, ``model.`` for a tuner,
    nothing for a plain model.

    Raises:
        ConfigError: ``model`` holds no lorakit adapters.
    """
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, Tuner) and hasattr(model, "peft_config"):  # a PeftModel: its keys are its files'
        return tuner, _file_prefix(tuner)
    if isinstance(model, BaseTuner):
        return model, "model."
    tuner = model.__dict__.get(_TUNER)
    if isinstance(tuner, BaseTuner) and tuner.model is model:
        return tuner, ""
    raise ConfigError(
        f"this {type(model).__name__} holds no lorakit adapters; pass a PeftModel (get_peft_model, "
        "PeftModel.from_pretrained) or a model given adapters by lorakit.inject_adapter_in_model"
    )


def _file_prefix(tuner: Tuner) -> str:
    return getattr(type(tuner), "file_key_prefix", KEY_PREFIX)


def _rekey(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old) else key


def _tensors_by_id(root: nn.Module) -> dict[int, list[str]]:
    """Tensor id -> its state-dict names under ``root`` (a tied tensor has several)."""
    out: dict[int, list[str]] = {}
    for name, tensor in nn.Module.state_dict(root, keep_vars=True).items():
        out.setdefault(id(tensor), []).append(name)
    return out


# -- injecting -------------------------------------------------------------------------------------------------


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put adapter layers into ``model`` in place and return it (PEFT's ``inject_adapter_in_model``): no
    ``PeftModel`` around it. Only the active adapter trains; ``model.peft_config`` holds the configs, as PEFT's.

    A second call on the same model adds the adapter next to the first (not made active, so frozen), as
    ``add_adapter``.

    Args:
        state_dict: when given, adapt exactly the modules its keys name (``<module path>.lora_A.weight`` ->
            ``<module path>``; a leading ``base_model.model.`` is ignored) instead of ``target_modules``. Only the
            keys are read; load the values with :func:`set_peft_model_state_dict`.
        low_cpu_mem_usage: accepted for PEFT's signature, with no effect: the adapter's tensors are created and
            initialised as usual (they are small), so the model is usable with or without a state dict loaded.

    Raises:
        ConfigError: a prompt-learning config (nothing to inject; PEFT refuses too), a method whose layers are not
            named by a key prefix and a ``state_dict`` was given, or an invalid config for this model (see
            :meth:`~lorakit.tuners.base.BaseTuner.inject`). On any error the model is left as it was.
    """
    tuner_cls = method_for(peft_config).tuner
    if not issubclass(tuner_cls, BaseTuner):
        raise ConfigError(
            f"inject_adapter_in_model puts adapter layers into a model; {type(peft_config).__name__} adds prompts to "
            "its inputs instead (PEFT refuses prompt learning here too): use get_peft_model"
        )
    if state_dict is not None:
        peft_config = _targets_from_state_dict(peft_config, tuner_cls, state_dict, model)
    tuner = model.__dict__.get(_TUNER)
    if isinstance(tuner, BaseTuner) and tuner.model is model:
        tuner._check_config_type(peft_config)
        if adapter_name in tuner.peft_config:
            raise AdapterExistsError(f"adapter {adapter_name!r} is in this model already; pick another adapter_name")
        tuner.peft_config[adapter_name] = peft_config
        try:
            tuner.inject(adapter_name, peft_config)
        except BaseException:
            del tuner.peft_config[adapter_name]
            raise
        return model
    tuner = tuner_cls(model, {adapter_name: peft_config}, adapter_name)
    model.__dict__[_TUNER] = tuner
    model.peft_config = tuner.peft_config  # as PEFT leaves it
    return model


def _targets_from_state_dict(
    config: PeftConfig, tuner_cls: type, state_dict: dict[str, Any], model: nn.Module
) -> PeftConfig:
    prefix = getattr(tuner_cls, "prefix", None)
    if getattr(config, "target_parameters", None):  # a parameter's layers nest: keys do not say which is which
        raise ConfigError(
            "inject_adapter_in_model with a state_dict cannot place target_parameters adapters (as in PEFT); inject "
            "with the config's own targets and no state_dict, then load the state_dict"
        )
    if not prefix or not hasattr(config, "target_modules"):
        raise ConfigError(
            f"{type(config).__name__} adapters are not found by a key prefix, so a state_dict cannot say where they "
            "go; inject with the config's own targets and no state_dict"
        )
    keys = [key.removeprefix(KEY_PREFIX).removeprefix("_orig_mod.") for key in state_dict]
    names = {key.rsplit("." + prefix, 1)[0] for key in keys if "." + prefix in key}
    try:
        configured = set(select_targets(model, config))
    except ConfigError:
        configured = set()
    if configured != names:  # PEFT warns too; the state dict decides
        warnings.warn(
            f"the state_dict adapts {sorted(names - configured)[:4]} that target_modules does not select, and not "
            f"{sorted(configured - names)[:4]} that it does; the state_dict's modules are adapted",
            stacklevel=3,
        )
    return dataclasses.replace(config, target_modules=sorted(names))


# -- adapter state dicts -----------------------------------------------------------------------------------------


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed as its file keys them (the adapter name taken out): what ``save_pretrained``
    writes, as PEFT's ``get_peft_model_state_dict``.

    Args:
        state_dict: take the values from this state dict of ``model`` (e.g. gathered from shards) instead of the
            live tensors; a tensor it lacks is taken live.
        unwrap_compiled: read ``model._orig_mod`` of a ``torch.compile``d model.
        save_embedding_layers: also the input/output embedding weights; ``"auto"``: when an embedding is adapted
            (lorakit's rule for saving, :func:`lorakit.persistence.adapter_tensors`).

    Returns:
        key -> tensor (detached, sharing memory with the model as ``state_dict()`` does).

    Raises:
        ConfigError: ``model`` holds no lorakit adapters. AdapterNotFoundError: no adapter of that name.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner, prefix = _resolve(model)
    tuner._check_adapter(adapter_name)
    tensors = adapter_tensors(tuner, adapter_name, save_embedding_layers)
    names = _tensors_by_id(model) if state_dict is not None else {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        given = next((state_dict[n] for n in names.get(id(tensor), ()) if n in state_dict), None) if names else None
        out[_rekey(key, _file_prefix(tuner), prefix)] = given if given is not None else tensor.detach()
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Copy an adapter state dict (as :func:`get_peft_model_state_dict` returns, or a file's) into adapter
    ``adapter_name``, which must exist (PEFT's ``set_peft_model_state_dict``).

    Every check runs before any tensor is written. Unlike ``load_adapter``, a state dict that covers only part of
    the adapter, or holds keys that match nothing, loads: the result lists them, as PEFT's does.

    Args:
        ignore_mismatched_sizes: skip (with a warning) tensors whose shape differs from the model's instead of
            refusing the whole state dict; they stay as they were and are listed as missing.
        low_cpu_mem_usage: accepted for PEFT's signature, with no effect (lorakit's adapters are never on the meta
            device; see :func:`inject_adapter_in_model`).

    Returns:
        torch's ``_IncompatibleKeys`` (as PEFT's): ``missing_keys``, every state-dict key of ``model`` that was not
        written (the base model's included, as ``load_state_dict(strict=False)`` reports them), and
        ``unexpected_keys``, the given keys that match nothing.

    Raises:
        ShapeMismatchError: a tensor of another shape (unless ``ignore_mismatched_sizes``).
        AdapterFileError: a key naming a base-model tensor the adapter does not own (PEFT would overwrite it).
        ConfigError, AdapterNotFoundError: as :func:`get_peft_model_state_dict`. The model is unchanged by any.
    """
    tuner, prefix = _resolve(model)
    tuner._check_adapter(adapter_name)
    file_prefix = _file_prefix(tuner)
    given: dict[str, str] = {}  # file key -> the caller's key
    for key in peft_model_state_dict:
        bare = key.removeprefix(KEY_PREFIX) if prefix == "" else key  # PEFT accepts both forms for a plain model
        given[_rekey(bare, prefix, file_prefix) if prefix else file_prefix + bare] = key
    state = {file_key: peft_model_state_dict[key] for file_key, key in given.items()}
    match = match_adapter_state(tuner, adapter_name, state)
    skip = ShapeMismatchError if ignore_mismatched_sizes else ()
    refusals = [error for error in match.refusals if not isinstance(error, skip)]
    if refusals:
        raise refusals[0]
    if match.mismatched:
        warnings.warn(
            f"ignore_mismatched_sizes=True: {len(match.mismatched)} tensors of another shape were not loaded, first "
            f"{given[match.mismatched[0]]!r}; they keep their values",
            stacklevel=2,
        )
    copy_adapter_state(match.copies)
    written = {id(dest) for dest, _ in match.copies}
    missing = [name for key, names in _tensors_by_id(model).items() if key not in written for name in names]
    return _IncompatibleKeys(missing, [given[key] for key in match.unexpected])


def check_load_options(kwargs: dict[str, Any], where: str) -> None:
    """Take PEFT's loading arguments lorakit reads itself out of a load's ``**kwargs``: ``torch_device`` (no effect:
    the file's tensors are copied into the adapter, on its layer's device) and ``ignore_mismatched_sizes``.

    Raises:
        ConfigError: ``ignore_mismatched_sizes=True``: PEFT then keeps random weights where a shape differs; lorakit
            loads an adapter whole or not at all (:func:`set_peft_model_state_dict` can skip them).
    """
    kwargs.pop("torch_device", None)
    if kwargs.pop("ignore_mismatched_sizes", False):
        raise ConfigError(
            f"{where}: ignore_mismatched_sizes=True would leave the tensors of another shape randomly initialised; "
            "lorakit loads an adapter whole. To load what fits, add the adapter and call lorakit."
            "set_peft_model_state_dict(model, lorakit.load_peft_weights(path), name, ignore_mismatched_sizes=True)"
        )


def default_key_mapping(model: nn.Module, config: PeftConfig, key_mapping: dict[str, str] | None) -> dict[str, str]:
    """``key_mapping``, or by default (PEFT's) the model's ``_checkpoint_conversion_mapping``: how transformers
    renames the modules of checkpoints saved before an architecture changed (none for prompt learning)."""
    if key_mapping is not None:
        return key_mapping
    return {} if config.is_prompt_learning else dict(getattr(model, "_checkpoint_conversion_mapping", None) or {})


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """An adapter folder's weights as saved (``adapter_model.safetensors``, else a legacy ``.bin`` read with
    ``weights_only``), on ``device`` (default as PEFT: ``cuda`` when available, else ``mps``, else ``cpu``).

    Args:
        model_id: an adapter folder, or a hub id already in the local Hugging Face cache.
        key_mapping: regex -> replacement applied to each key (see :func:`remap_keys`).
        hf_hub_download_kwargs: ``subfolder`` and the hub options (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``: :func:`lorakit.io.hub_options`); ``user_agent`` is accepted and unused.

    Raises:
        AdapterFileError: no weights file, or a corrupt one. ConfigError: an unknown keyword argument, or a
            ``key_mapping`` that does not apply.
    """
    subfolder = hf_hub_download_kwargs.pop("subfolder", None)
    hf_hub_download_kwargs.pop("user_agent", None)
    hub = hub_options(hf_hub_download_kwargs, "load_peft_weights")
    state = remap_keys(read_adapter_weights(model_id, subfolder=subfolder, hub=hub), key_mapping)
    device = device or _default_device()
    return {key: tensor.to(device) for key, tensor in state.items()}


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def remap_keys(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: in each key, after its ``base_model.model.`` (or ``base_model.``) prefix, replace the
    first pattern of ``key_mapping`` (a regex) that matches; keys no pattern matches stay as they are.

    Used for models whose transformers class was renamed since the adapter was saved (their
    ``_checkpoint_conversion_mapping``), or by hand.

    Raises:
        ConfigError: a pattern that is not a valid regex, or two keys mapped to the same key.
    """
    if not key_mapping:
        return state
    try:
        rules = [(re.compile(pattern), replacement) for pattern, replacement in key_mapping.items()]
    except re.error as exc:
        raise ConfigError(f"key_mapping holds an invalid regex: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = next((p for p in (KEY_PREFIX, "base_model.") if key.startswith(p)), "")
        rest = key[len(prefix) :]
        for pattern, replacement in rules:
            new, count = pattern.subn(replacement, rest)
            if count:
                rest = new
                break
        if prefix + rest in out:
            raise ConfigError(f"key_mapping maps two keys of the adapter to {prefix + rest!r}; check its patterns")
        out[prefix + rest] = tensor
    return out


# -- the base model's own state dict -------------------------------------------------------------------------------


def _original_key(root: nn.Module) -> Callable[[str], str | None]:
    """A function from a state-dict key of ``root`` to the key it had before adapters were added, or None for a
    tensor an adapter owns: the ``base_layer.`` / ``original_module.`` step into an adapter layer's original module
    is removed, and anything else of an adapter layer is the adapter's."""
    layers = {name: m for name, m in root.named_modules(remove_duplicate=False) if name and isinstance(m, AdapterLayer)}
    inner = {
        name: next(n for n, m in layer.named_children() if m is layer.original()) for name, layer in layers.items()
    }

    def original(key: str) -> str | None:
        path, kept = "", []
        for part in key.split("."):
            if path in inner:
                if part != inner[path]:
                    return None
            else:
                kept.append(part)
            path = f"{path}.{part}" if path else part
        return ".".join(kept)

    return original


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original keys, without any adapter tensor (PEFT's
    ``get_base_model_state_dict``): ``...q_proj.base_layer.weight`` is ``...q_proj.weight`` again, a
    ``modules_to_save`` module's original is ``classifier.weight`` and its copies are left out.

    Raises:
        ConfigError: ``model`` holds no lorakit adapters.
    """
    base = _resolve(model)[0].model
    original = _original_key(base)
    return {key: value for name, value in base.state_dict().items() if (key := original(name)) is not None}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load a state dict with the base model's original keys into the adapted model (PEFT's
    ``set_base_model_state_dict``; the inverse of :func:`get_base_model_state_dict`). Adapters are untouched.

    Returns:
        ``_IncompatibleKeys``: the original keys the state dict lacks, and its keys that name nothing.

    Raises:
        ConfigError: with ``strict``, missing or unexpected keys (PEFT raises RuntimeError).
        ShapeMismatchError: a tensor of another shape. Nothing is loaded when either is raised.
    """
    base = _resolve(model)[0].model
    original = _original_key(base)
    current = base.state_dict(keep_vars=True)
    by_original = {key: name for name in current if (key := original(name)) is not None}
    missing = [key for key in by_original if key not in state_dict]
    unexpected = [key for key in state_dict if key not in by_original]
    if strict and (missing or unexpected):
        raise ConfigError(
            f"the state dict does not fit the base model: {len(missing)} keys missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}; pass strict=False to load the keys that fit"
        )
    load = {by_original[key]: value for key, value in state_dict.items() if key in by_original}
    for name, value in load.items():
        if tuple(current[name].shape) != tuple(value.shape):
            raise ShapeMismatchError(
                f"base tensor {original(name)!r} has shape {tuple(value.shape)} in the state dict but "
                f"{tuple(current[name].shape)} in the model; nothing was loaded"
            )
    base.load_state_dict(load, strict=False)
    return _IncompatibleKeys(missing, unexpected)
