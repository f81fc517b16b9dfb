"""A trained PiSSA/OLoRA adapter as a plain LoRA adapter of the original base model (PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

PiSSA (arXiv 2404.02948, §3) and OLoRA (arXiv 2406.01775) train on the residual ``W_res = W − s·B₀A₀`` of the
original weight W, where ``B₀, A₀`` is the start (:mod:`lorakit.tuners.lora.starts`). After training the layer
computes ``W_res + s·BA = W + s·(BA − B₀A₀)``, which is LoRA of rank 2r on W itself (PiSSA paper §4, "PiSSA to
LoRA"; PEFT's ``subtract_mutated_init``)::

    A' = [A; A₀]   (2r, k)        B' = [B, −B₀]   (d, 2r)        s'·B'A' = s·(BA − B₀A₀)

with ``r' = 2r`` and ``α' = 2α`` (rsLoRA: ``α' = √2·α``), so s' = s. ``B₀, A₀`` come from the adapter saved right
after creation (the folder passed as ``path_initial_model_for_weight_conversion``). The written config says
``init_lora_weights=True``: loading it re-runs nothing, on any copy of the original base, in lorakit or PEFT.

Everything else the adapter saves (DoRA magnitudes, ``modules_to_save`` copies, biases, embedding weights) is
written unchanged: DoRA normalises ``W + s'·B'A' = W_res + s·BA``, the same matrix, so its magnitudes still apply.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from lorakit.tuners.adalora.config import AdaLoraConfig
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.starts import rewrites_base, start_name

if TYPE_CHECKING:
    from lorakit.config import PeftConfig

#: File-key suffixes of the A and B factors (linears and convolutions, embeddings).
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")
#: The inits PEFT converts without a warning (lorakit runs CorDA and LoRA-GA elsewhere or not at all).
_CONVERTIBLE = ("pissa", "olora", "corda", "lora_ga")


def converted_adapter(
    tuner: Any,
    name: str,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    path: str,
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """Adapter ``name`` converted to plain LoRA on the original base: its file config and tensors.

    Args:
        tuner: the :class:`~lorakit.tuners.lora.model.LoraModel` holding the trained adapter.
        config: the config as the file will hold it (a copy, changed in place: r, α and their patterns doubled,
            ``init_lora_weights=True``).
        tensors: the adapter's file tensors (file key -> tensor), as a plain save writes them.
        start: the tensors of the adapter saved right after creation (its ``B₀, A₀``), read from ``path``.

    Raises:
        ConfigError: an adapter that is not plain LoRA (AdaLoRA).
        AdapterFileError: ``start`` lacks a factor the adapter has.
        ShapeMismatchError: a factor of ``start`` has another shape than the adapter's.
    """
    if not isinstance(config, LoraConfig) or isinstance(config, AdaLoraConfig):
        raise ConfigError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA, OLoRA); adapter {name!r} "
            f"is {type(config).__name__}"
        )
    _warn_if_inexact(tuner, name, config)
    return _doubled(config), _concatenated(tensors, start, path)


def _concatenated(
    tensors: dict[str, torch.Tensor], start: dict[str, torch.Tensor], path: str
) -> dict[str, torch.Tensor]:
    """``A' = [A; A₀]`` and ``B' = [B, −B₀]`` for every factor of ``tensors``; other tensors unchanged."""
    out = {}
    for key, tensor in tensors.items():
        is_a, is_b = key.endswith(_A_SUFFIXES), key.endswith(_B_SUFFIXES)
        if not (is_a or is_b):
            out[key] = tensor.detach()
            continue
        if key not in start:
            raise AdapterFileError(
                f"the initial adapter in {path!r} has no {key!r}; save the adapter right after get_peft_model (with "
                "the same config) into that folder, then train, then convert"
            )
        first = start[key].to(device=tensor.device, dtype=tensor.dtype)
        if first.shape != tensor.shape:
            raise ShapeMismatchError(
                f"{key!r} is {tuple(tensor.shape)} in the adapter but {tuple(first.shape)} in the initial adapter "
                f"{path!r}; they are not the same adapter before and after training"
            )
        out[key] = torch.cat([tensor.detach(), first], dim=0) if is_a else torch.cat([tensor.detach(), -first], dim=1)
    return out


def _doubled(config: PeftConfig) -> PeftConfig:
    """The config of the rank-2r adapter with the same scaling: r, α and their patterns doubled (rsLoRA: α·√2,
    since s = α/√r), ``init_lora_weights=True``."""
    factor = math.sqrt(2) if config.use_rslora else 2
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= factor
    config.rank_pattern = {key: 2 * rank for key, rank in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {key: factor * alpha for key, alpha in (config.alpha_pattern or {}).items()}
    return config


def _warn_if_inexact(tuner: Any, name: str, config: PeftConfig) -> None:
    """PEFT's two warnings: an init the conversion is not meant for, and a quantized residual."""
    init = config.init_lora_weights
    if init is not True and start_name(init) not in _CONVERTIBLE and init not in _CONVERTIBLE:
        warnings.warn(
            f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA (or CorDA/LoRA-GA) adapters; adapter "
            f"{name!r} has init_lora_weights={init!r}, so the result is its change since the initial save",
            stacklevel=4,
        )
    if rewrites_base(init) and any(
        layer.kind.quantized and name in layer.adapter_names() for _, layer in tuner.weight_layers()
    ):
        warnings.warn(
            f"adapter {name!r} was trained on a quantized residual Q(W − s·B₀A₀); the converted adapter on the "
            "quantized original Q(W) differs from it by the quantization error (PEFT warns alike); use the residual "
            "model with the unconverted adapter for exact results",
            stacklevel=4,
        )
