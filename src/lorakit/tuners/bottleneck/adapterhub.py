"""Bottleneck adapters saved by the adapters library (AdapterHub, ``pip install adapters``), loaded into lorakit.

The adapters library writes a folder holding ``adapter_config.json`` in its own layout (the adapter's ``BnConfig``
under ``"config"``, with ``name``, ``model_type`` and ``version`` beside it) and the weights: ``adapter.safetensors``
when saved with ``model.save_adapter(folder, name, use_safetensors=True)``, else ``pytorch_adapter.bin``, a pickle.
Models with a static head also get the head's weights (``head_config.json`` + ``model_head.safetensors``).

lorakit reads the safetensors files only (it never unpickles), maps the library's keys
(``model.layers.0.output_adapters.adapters.<name>.adapter_up.weight``) onto its own layers, checks everything
before the model changes, and computes what the library computes on the same base weights (tested against
adapters 1.3.0). Once loaded, ``save_pretrained`` writes the adapter in lorakit's own format.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lorakit.config import read_json
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.model import PeftModel
from lorakit.persistence import load_adapter_state, module_key
from lorakit.tuners.bottleneck.config import BottleneckConfig
from lorakit.tuners.bottleneck.model import BottleneckModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLED_WEIGHTS_FILE = "pytorch_adapter.bin"
HEAD_FILE = "model_head.safetensors"
PICKLED_HEAD_FILE = "pytorch_model_head.bin"

# Where the adapters library keeps each sub-block's adapters, relative to a block (its model mixins: a
# BottleneckLayer attribute of the decoder block, or BERT's output modules, which are BottleneckLayers).
_DECODER = {"attention": "attention_adapters", "feedforward": "output_adapters"}
_BERT = {"attention": "attention.output", "feedforward": "output"}
ADAPTERS_MODULES: dict[str, dict[str, str]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "gpt2": _DECODER,
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
}

# BnConfig fields: computed by lorakit (the same names), off-only (the value that means "feature off"), or
# informational (they only shape features that are off, or the initialisation).
_FIELDS = (
    "mh_adapter output_adapter reduction_factor non_linearity original_ln_before original_ln_after residual_before_ln "
    "adapter_residual_before_ln ln_before ln_after init_weights is_parallel scaling use_gating dropout leave_out"
).split()
_OFF_ONLY = {"inv_adapter": None, "cross_adapter": False, "phm_layer": False, "stochastic_depth": 0.0}
_INFORMATIONAL = set(
    "architecture init_weights_seed inv_adapter_reduction_factor phm_dim factorized_phm_W shared_W_phm shared_phm_rule "
    "factorized_phm_rule phm_c_init phm_init_range learn_phm hypercomplex_nonlinearity phm_rank phm_bias".split()
)
# The adapters library's names for its standard configs.
_NAMED = {
    "seq_bn": BottleneckConfig.pfeiffer,
    "pfeiffer": BottleneckConfig.pfeiffer,
    "double_seq_bn": BottleneckConfig.houlsby,
    "houlsby": BottleneckConfig.houlsby,
    "par_bn": BottleneckConfig.parallel,
}
# Files written before adapters-transformers v3 (no "version") name the tanh GELU "gelu" (its ACTIVATION_RENAME).
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}


def config_from_adapters(data: dict[str, Any]) -> BottleneckConfig:
    """The :class:`BottleneckConfig` of an adapters-library ``adapter_config.json`` (parsed), or of its inner
    ``"config"`` dict.

    Raises:
        ConfigError: not a bottleneck adapter (LoRA, prefix tuning, a config union ...), or one using a feature
            lorakit does not compute (invertible adapters, PHM layers, cross-attention adapters, stochastic depth).
    """
    inner = data.get("config", data) if isinstance(data, dict) else data
    if isinstance(inner, str):
        if inner.lower() not in _NAMED:
            raise ConfigError(f"adapter config {inner!r} is not one lorakit knows; accepted names: {sorted(_NAMED)}")
        return _NAMED[inner.lower()]()
    if not isinstance(inner, dict):
        raise ConfigError(f"the adapters library's config is {inner!r}; expected a dict of BnConfig fields")
    architecture = inner.get("architecture")
    if architecture not in (None, "bottleneck"):
        raise ConfigError(
            f"this adapters-library adapter is {architecture!r}; lorakit reads its bottleneck adapters (BnConfig: "
            "SeqBnConfig, DoubleSeqBnConfig, ParBnConfig, ...) only"
        )
    kwargs: dict[str, Any] = {}
    for key, value in inner.items():
        if key in _FIELDS:
            kwargs[key] = value
        elif key in _OFF_ONLY:
            if value != _OFF_ONLY[key] and value not in (None, 0, False):
                raise ConfigError(
                    f"this adapter uses {key}={value!r}, a feature of the adapters library that lorakit does not "
                    f"compute; lorakit loads adapters with {key}={_OFF_ONLY[key]!r}"
                )
        elif key not in _INFORMATIONAL:
            warnings.warn(f"ignoring unknown adapters-library config field {key!r}", stacklevel=2)
    if "version" not in data and kwargs.get("non_linearity") in _LEGACY_ACTIVATIONS:
        kwargs["non_linearity"] = _LEGACY_ACTIVATIONS[kwargs["non_linearity"]]
    if "non_linearity" not in kwargs or "reduction_factor" not in kwargs:
        raise ConfigError(
            "the adapters library's config lacks non_linearity or reduction_factor, which BnConfig requires"
        )
    kwargs.setdefault("original_ln_before", False)  # BnConfig's defaults where they differ from lorakit's
    if isinstance(kwargs.get("scaling"), int) and not isinstance(kwargs["scaling"], bool):
        kwargs["scaling"] = float(kwargs["scaling"])
    return BottleneckConfig(**kwargs)


def read_adapters_folder(path: str | os.PathLike) -> tuple[BottleneckConfig, str, str | None, dict[str, torch.Tensor]]:
    """``(config, adapter name, model_type, tensors)`` of an adapters-library folder, safetensors only.

    Raises:
        AdapterFileError: a missing folder or config, weights only as a pickle (``pytorch_adapter.bin``: the message
            says how to re-save them), an unreadable file.
        ConfigError: see :func:`config_from_adapters`.
    """
    folder = os.fspath(path)
    config_file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise AdapterFileError(
            f"no {CONFIG_FILE} in {folder!r}; give the folder the adapters library's save_adapter wrote"
        )
    data = read_json(config_file)
    if "peft_type" in data:
        raise ConfigError(
            f"{folder!r} holds a PEFT/lorakit adapter (peft_type={data['peft_type']!r}); load it with "
            "lorakit.PeftModel.from_pretrained"
        )
    config = config_from_adapters(data)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise AdapterFileError(f"{config_file!r} names no adapter ('name'); was it written by the adapters library?")
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLED_WEIGHTS_FILE)):
            raise AdapterFileError(_pickle_refusal(folder, PICKLED_WEIGHTS_FILE, name))
        raise AdapterFileError(f"no adapter weights in {folder!r}: expected {WEIGHTS_FILE!r}")
    if data.get("model_name"):
        config.base_model_name_or_path = str(data["model_name"])
    return config, name, data.get("model_type"), _read_safetensors(weights)


def load_adapters_library(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load a bottleneck adapter saved by the adapters library onto ``model``.

    Args:
        model: the base model the adapter was trained on (a transformers model, as loaded by ``from_pretrained``),
            or a :class:`~lorakit.PeftModel` with bottleneck adapters, which gets one more (not made active).
        path: the folder ``save_adapter(folder, name, use_safetensors=True)`` wrote.
        adapter_name: the adapter's name in lorakit (the library's own name is in the file).
        is_trainable: False (the default) loads for inference: the adapter's weights are frozen, eval mode.

    Returns:
        the :class:`~lorakit.PeftModel` (a generic one: its forward takes the base model's arguments).

    Raises:
        AdapterFileError: see :func:`read_adapters_folder`; tensors that fit no layer of this model; a saved
            prediction head that differs from the model's (lorakit loads the adapter, not heads).
        ConfigError: see :func:`config_from_adapters`; saved for another architecture.
        ShapeMismatchError: tensors whose shapes do not fit this model.
        On any of them the model is left exactly as it was.
    """
    config, name, model_type, tensors = read_adapters_folder(path)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    ours = getattr(getattr(base, "config", None), "model_type", None)
    if model_type is not None and ours is not None and model_type != ours:
        raise ConfigError(
            f"the adapter in {os.fspath(path)!r} was saved for model_type={model_type!r}; this model is {ours!r}"
        )
    _check_head(base, os.fspath(path))
    config.inference_mode = not is_trainable
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        try:
            _load(model.base_model, adapter_name, name, ours, tensors)
        except BaseException:
            model.delete_adapter(adapter_name)
            raise
        return model
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        peft_model = PeftModel(model, config, adapter_name)
        try:
            _load(peft_model.base_model, adapter_name, name, ours, tensors)
        except BaseException:
            peft_model.base_model.unload(merge=False)
            raise
    except BaseException:
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), param.requires_grad))
        raise
    if not is_trainable:
        peft_model.eval()
    return peft_model


def _load(tuner: BottleneckModel, adapter_name: str, name: str, model_type: str | None, tensors: dict) -> None:
    """Copy the library's tensors into adapter ``adapter_name`` (every key checked before any is written)."""
    if not isinstance(tuner, BottleneckModel):
        raise ConfigError(f"this model holds {tuner.config_class.NAME} adapters; bottleneck adapters cannot join them")
    modules = ADAPTERS_MODULES.get(model_type or "")
    if modules is None:
        raise ConfigError(
            f"lorakit maps the adapters library's files for model_type in {sorted(ADAPTERS_MODULES)}, "
            f"not {model_type!r}"
        )
    layers = {
        (int(layer.block.rsplit(".", 1)[-1]), layer.sublayer): site
        for site, layer in tuner.weight_layers()
        if adapter_name in layer.adapter_names()
    }
    ln_before = tuner.peft_config[adapter_name].ln_before
    renames = _renames(ln_before)
    state: dict[str, torch.Tensor] = {}
    marker = f".adapters.{name}."
    for key, tensor in tensors.items():
        left, found, param = key.partition(marker)
        sublayer = next(
            (s for s, m in sorted(modules.items(), key=lambda i: -len(i[1])) if left.endswith("." + m)), None
        )
        index = re.search(r"\.(\d+)$", left[: -len(modules[sublayer]) - 1]) if found and sublayer else None
        site = layers.get((int(index.group(1)), sublayer)) if index else None
        if site is None or param not in renames:
            raise AdapterFileError(
                f"the adapter file holds {key!r}, which fits no bottleneck adapter of this model (adapter {name!r}, "
                "expected <block>.<attention_adapters|output_adapters|attention.output|output>.adapters.<name>."
                "<adapter_down.0|adapter_up|...>); was it saved for another model or config?"
            )
        ours = module_key(site, renames[param])
        if ours in state and not torch.equal(state[ours], tensor):
            raise AdapterFileError(f"the adapter file holds two different values for {ours!r} (one is {key!r})")
        state[ours] = tensor
    load_adapter_state(tuner, adapter_name, state)


def _renames(ln_before: bool) -> dict[str, str]:
    """The library's tensor names inside one ``Adapter`` module -> lorakit's. Its ``adapter_down`` is a Sequential
    ``[LayerNorm (with ln_before), Linear, σ]``; the LayerNorm is also its ``adapter_norm_before``."""
    down = "adapter_down.1" if ln_before else "adapter_down.0"
    parts = {down: "bottleneck_down", "adapter_up": "bottleneck_up", "adapter_norm_after": "bottleneck_norm_after"}
    parts["gate"] = "bottleneck_gate"
    if ln_before:
        parts["adapter_down.0"] = parts["adapter_norm_before"] = "bottleneck_norm_before"
    renames = {f"{k}.{t}": f"{v}.{t}" for k, v in parts.items() for t in ("weight", "bias")}
    renames["scaling"] = "bottleneck_scale"
    return renames


def _check_head(model: nn.Module, folder: str) -> None:
    """Refuse a saved head that differs from ``model``'s: lorakit loads the adapter alone, and a silently ignored
    trained head would give another model."""
    head = os.path.join(folder, HEAD_FILE)
    if not os.path.isfile(head):
        if os.path.isfile(os.path.join(folder, PICKLED_HEAD_FILE)):
            raise AdapterFileError(_pickle_refusal(folder, PICKLED_HEAD_FILE, None))
        return
    own = {_plain(k): v for k, v in model.state_dict().items()}
    for key, tensor in _read_safetensors(head).items():
        mine = own.get(key)
        if mine is None or mine.shape != tensor.shape or not torch.equal(mine.detach().cpu().to(tensor.dtype), tensor):
            raise AdapterFileError(
                f"{head!r} holds a prediction head ({key!r}) that differs from this model's; lorakit loads the "
                "bottleneck adapter only. Load the head into the base model first, e.g. "
                "model.load_state_dict(safetensors.torch.load_file(head_file), strict=False), then load the adapter"
            )


def _plain(key: str) -> str:
    """A state-dict key without the wrappers lorakit inserts (``base_layer``, ``original_module``)."""
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"adapter weights file {file!r} is corrupt or unreadable: {exc}") from exc


def _pickle_refusal(folder: str, file: str, name: str | None) -> str:
    return (
        f"{folder!r} holds its weights as {file!r}, a pickle, which can run code when loaded; lorakit reads "
        "safetensors only and never unpickles. Re-save the adapter with the adapters library, which writes "
        f"{WEIGHTS_FILE!r} (and {HEAD_FILE!r}): model.load_adapter(folder); "
        f"model.save_adapter(folder, {name or '<name>'!r}, use_safetensors=True)"
    )
