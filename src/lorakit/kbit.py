"""Quantized base models for QLoRA (Dettmers et al. 2023, arXiv 2305.14314), with bitsandbytes.

Two ways in, both ending with bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` layers that lorakit's adapter
layers wrap like any linear (:mod:`lorakit.layers.quantized`):

* a transformers model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=...)``;
* :func:`quantize`, which converts an already-loaded model in place (the default SmolLM2 model arrives in
  fp32 from its GGUF file).

Then :func:`prepare_model_for_kbit_training` (PEFT's name) freezes the base, upcasts small half-precision
parameters (norms, biases) to fp32 and turns on activation checkpointing.

NF4 (paper §3): 16 levels at the quantiles of N(0, 1), blocks of 64 weights each scaled by its absmax.
Double quantization: the fp32 absmax of every block is itself quantized to 8 bits in blocks of 256, which
takes the overhead from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.layers import AdapterLayer, kind_for
from lorakit.layers.quantized import guard_cpu_repacking, is_bnb_layer
from lorakit.tuners.lora.layer import LoraLayer

try:
    from transformers.pytorch_utils import Conv1D as HFConv1D
except ImportError:  # pragma: no cover
    HFConv1D = None

BNB_INSTALL = "pip install 'bitsandbytes>=0.49'"
QUANT_TYPES = ("nf4", "fp4")


def import_bitsandbytes() -> Any:
    """bitsandbytes, or :class:`MissingDependencyError` with the install command."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError(
            f"4-bit and 8-bit base models need bitsandbytes (>= 0.49 runs on CPU as well as CUDA): {BNB_INSTALL}"
        ) from exc
    return bitsandbytes


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether a layer kind stores this module's weight quantized (bitsandbytes 4/8-bit linears)."""
    kind = kind_for(module)
    return kind is not None and kind.quantized


def forget_quantization(model: nn.Module) -> None:
    """Drop what transformers records about a bitsandbytes load (``hf_quantizer``, ``quantization_config``), once
    no quantized layer is left: ``save_pretrained`` then writes a plain full-precision model."""
    if any(is_quantized_layer(m) for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    for holder, attr in ((model, "hf_quantizer"), (getattr(model, "config", None), "quantization_config")):
        if holder is not None and hasattr(holder, attr):
            delattr(holder, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: list[str] | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) but the output head by a quantized layer, in place.

    Args:
        model: a loaded model (any device bitsandbytes supports; CPU needs bitsandbytes >= 0.49).
        bits: 4 (``Linear4bit``, QLoRA) or 8 (``Linear8bitLt``, LLM.int8() with outlier threshold 6).
        quant_type: 4-bit code, ``"nf4"`` (NormalFloat, the paper's) or ``"fp4"``.
        double_quant: quantize the blocks' absmax constants again (8 bit, blocks of 256).
        compute_dtype: dtype of the 4-bit layers' matmuls (default: each layer's current dtype). On a CPU with
            AVX512-BF16, bitsandbytes repacks a 4-bit layer at its first no-grad eval forward for a faster
            kernel that computes in bf16; lorakit leaves that to layers whose compute dtype is bf16 (and whose
            shape the kernel takes), see :mod:`lorakit.layers.quantized`.
        skip_modules: names (or name endings) kept in full precision; the output embedding always is.

    A model that already holds lorakit adapters (e.g. after a LoftQ initialisation) keeps them in full
    precision; only the base layers under them are quantized.

    A transformers model also gets the matching ``config.quantization_config`` (``BitsAndBytesConfig``), as if
    it had been loaded in 4/8 bit: its ``save_pretrained`` then writes a pre-quantized checkpoint that plain
    transformers loads back into the same bitsandbytes layers (``from_pretrained(folder)``, nothing more).

    Returns:
        ``model`` itself.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
        ConfigError: bad ``bits`` / ``quant_type``, or an adapted layer with merged adapters.
    """
    if bits not in (4, 8):
        raise ConfigError(f"bits={bits!r} is not supported; accepted: 4 (NF4/FP4, QLoRA) or 8 (LLM.int8())")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not supported; accepted: {', '.join(QUANT_TYPES)}")
    bnb = import_bitsandbytes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = list(skip_modules or [])
    dtypes: list[torch.dtype] = []
    adapter_layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    inside = {id(sub) for layer in adapter_layers for sub in layer.modules() if sub is not layer}
    for name, module in list(model.named_modules()):
        if module is head or any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(module, LoraLayer):  # an adapted layer: its base is quantized, its adapters are not
            if _convertible(module.base_layer) and module.base_layer is not head:
                if module.merged_adapters:
                    raise ConfigError(
                        f"{name} holds merged adapters {module.merged_adapters}; unmerge them before quantizing "
                        "(a quantized weight could not be unmerged exactly)"
                    )
                dtypes.append(module.base_layer.weight.dtype)
                module.replace_base(_quantized(bnb, module.base_layer, bits, quant_type, double_quant, compute_dtype))
            continue
        if id(module) in inside or not _convertible(module):
            continue  # adapter factors and trained copies stay in full precision
        parent_name, _, child = name.rpartition(".")
        dtypes.append(module.weight.dtype)
        layer = _quantized(bnb, module, bits, quant_type, double_quant, compute_dtype)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    if dtypes:
        head_names = [n.rpartition(".")[2] for n, m in model.named_modules() if m is head]
        dtype = compute_dtype or dtypes[0]
        _record_quantization(model, bits, quant_type, double_quant, dtype, head_names + skip)
    return model


def _record_quantization(
    model: nn.Module, bits: int, quant_type: str, double_quant: bool, dtype: torch.dtype, kept: list[str]
) -> None:
    """Write the ``BitsAndBytesConfig`` transformers would have loaded ``model`` with into its config, unless
    one is there already (a model loaded in 4/8 bit) or the model has no transformers config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or getattr(config, "quantization_config", None) is not None:
        return
    from transformers import BitsAndBytesConfig

    if bits == 4:
        settings = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=kept or None,
        )
    else:
        settings = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=kept or None)
    config.quantization_config = settings


def _convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear or (HFConv1D is not None and isinstance(module, HFConv1D))


def _quantized(
    bnb: Any, module: nn.Module, bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype | None
) -> nn.Module:
    """A bitsandbytes layer computing what ``module`` (nn.Linear or Conv1D) computes, its weight quantized."""
    weight = module.weight.detach()
    weight = weight.t() if not isinstance(module, nn.Linear) else weight  # Conv1D stores (in, out)
    out_features, in_features = weight.shape
    dtype = compute_dtype or weight.dtype
    with torch.device("meta"):
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=module.bias is not None,
                compute_dtype=dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=module.bias is not None, has_fp16_weights=False, threshold=6.0
            )
    if bits == 4:
        param = bnb.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quant_type,
            module=layer,
        )
    else:
        half = weight.contiguous().to(torch.float16)
        param = bnb.nn.Int8Params(half, requires_grad=False, has_fp16_weights=False)
    layer.weight = param.to(weight.device)  # the move quantizes
    if module.bias is not None:
        bias = module.bias.detach().to(dtype if bits == 4 else module.bias.dtype)
        layer.bias = nn.Parameter(bias, requires_grad=False)
    if bits == 4:
        guard_cpu_repacking(layer)  # bitsandbytes' CPU repacking: only where it works, saved exactly
    return layer


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Get a quantized base model ready for adapter training (PEFT's function, same behaviour).

    Freezes every parameter, upcasts the half-precision parameters that are not quantized (layer norms,
    biases, embeddings) to fp32 for stable updates and gradients, and with ``use_gradient_checkpointing``
    turns on activation checkpointing (``use_reentrant=False`` unless given) with input gradients enabled,
    so that the frozen embedding still passes gradients to the adapters behind it.

    Usually called before adapters exist. Called on a model that holds lorakit adapters already (LoftQ
    initialises them before the base is quantized), it leaves whether their parameters train as it was.

    4-bit layers also stay in bitsandbytes' reference layout from then on (put back there if an eval forward
    had repacked them for the AVX512-BF16 CPU kernel, see :mod:`lorakit.layers.quantized`): that layout is for
    inference only, and a training forward on it goes through a kernel without a backward (bitsandbytes
    warns; the gradients of every adapter before the layer are silently lost, or a layer with a bias fails).

    Returns:
        ``model`` itself.
    """
    adapters = {
        id(param)
        for layer in model.modules()
        if isinstance(layer, AdapterLayer)
        for name in layer.adapter_names()
        for param in layer.adapter_parameters(name)
    }
    for param in model.parameters():
        if id(param) not in adapters:
            param.requires_grad_(False)
    for module in model.modules():
        if is_bnb_layer(module, "Linear4bit"):
            guard_cpu_repacking(module, allow=False)
    for param in model.parameters():
        if type(param).__name__ in ("Params4bit", "Int8Params"):
            continue  # quantized storage stays as it is
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing:
        enable_activation_checkpointing(model, gradient_checkpointing_kwargs)
    return model


def enable_activation_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Activation checkpointing (``use_reentrant=False`` unless ``kwargs`` say otherwise) with input gradients on,
    so that a frozen embedding still passes gradients to the adapters behind it."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | os.PathLike | None = None,
    adapter_name: str = "default",
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """LoftQ (one alternation) for adapters on a base that is quantized already (PEFT's name and arguments).

    For every layer with ``adapter_name`` on a 4/8-bit base, A and B become the rank-r SVD of W − Q, where Q
    is the stored quantized weight and W the original one: Q + s·BA is then the closest a rank-r adapter can
    get to W. Unlike ``init_lora_weights="loftq"``, the quantized base is left as it is, so the adapter stays
    valid on any base quantized the same way from the same W (``lorakit merge --bits 4``, for instance).

    Args:
        model_path: a folder (or file) of ``*.safetensors`` with the original weights under the base model's
            names (``model.layers.0.self_attn.q_proj.weight``); default: the model's ``name_or_path``.
        weights: instead of files, the original weights by module name (``{"model.layers.0.self_attn.q_proj":
            W}``) in ``nn.Linear``'s ``(out, in)`` layout, e.g. kept from the full-precision model before
            :func:`quantize`.

    Returns:
        per adapted module, ``{"quantization_error": ‖W − Q‖, "loftq_error": ‖W − (Q + s·BA)‖}``.

    Raises:
        ConfigError: no adapted quantized layer, or an original weight that is missing or has another shape
            (the adapters are then left as they were).
    """
    from lorakit.tuners.lora.loftq import loftq_fit_quantized

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = {
        name: m
        for name, m in base.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in m.r and m.kind.quantized
    }
    if not layers:
        raise ConfigError(f"no layer holds adapter {adapter_name!r} on a quantized base; quantize the base first")
    originals = dict(weights) if weights is not None else _read_original_weights(base, model_path, layers)
    missing = [name for name in layers if name not in originals]
    if missing:
        raise ConfigError(f"no original weight for {len(missing)} adapted layer(s), e.g. {missing[0]!r}")
    saved = {
        name: [p.detach().clone() for p in layer.adapter_parameters(adapter_name)] for name, layer in layers.items()
    }
    report = {}
    try:
        for name, layer in layers.items():
            report[name] = loftq_fit_quantized(layer, adapter_name, originals[name])
    except BaseException:
        with torch.no_grad():
            for name, layer in layers.items():
                for param, value in zip(layer.adapter_parameters(adapter_name), saved[name]):
                    param.copy_(value)
        raise
    return report


def _read_original_weights(
    model: nn.Module, model_path: str | os.PathLike | None, layers: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """The ``<module>.weight`` tensors of ``layers`` from the safetensors files at ``model_path``."""
    import sys

    from safetensors import safe_open

    if hasattr(sys.modules.get(type(model).__module__), "Conv1D"):
        raise ConfigError(
            f"{type(model).__name__} checkpoints store transformers Conv1D weights as (in, out); pass weights= "
            "with each original weight as (out, in) instead of model_path"
        )
    path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
    files = sorted(Path(path).glob("*.safetensors")) if path and Path(path).is_dir() else [Path(path or "")]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(
            f"no safetensors files with the original weights at {str(path)!r}; pass model_path= (a folder of "
            "*.safetensors) or weights= (module name -> full-precision weight)"
        )
    wanted = {f"{name}.weight": name for name in layers}
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in wanted:
                    found[wanted[key]] = f.get_tensor(key)
    return found
