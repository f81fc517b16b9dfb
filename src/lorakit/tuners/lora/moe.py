"""Mixture-of-experts models and their targets: fused expert parameters, and PEFT's renaming of v4 targets.

transformers 5 fuses each MoE layer's experts into stacked parameters (``mlp.experts.gate_up_proj (E, 2f, h)``,
``mlp.experts.down_proj (E, h, f)``) and turns the router into a custom module (``mlp.gate.weight``): none of them is
an ``nn.Linear`` any more, so ``target_modules`` cannot reach them; ``target_parameters`` does
(:mod:`lorakit.tuners.lora.param_wrapper`).

PEFT 0.21 rewrites a LoRA config for the MoE architectures whose weights transformers converts from its v4 layout (the
Mixtral family and the models that reuse Qwen2-MoE's conversion: Qwen3-MoE, OLMoE, DeepSeek-V3, ...): the v4 names in
``target_modules`` become ``target_parameters`` (``w1``/``w3`` → ``gate_up_proj``, ``w2`` → ``down_proj``, ``gate`` →
``gate.weight``), and since gate and up projections now share one parameter, ``gate_up_proj`` gets twice the rank and
twice the alpha (the same scaling, one rank-r update for each half). ``"all-linear"`` counts as naming them all, so on
Mixtral it adapts the attention projections, the experts and the routers. :func:`convert_moe_targets` does the same
rewrite, so a config selects the same weights in both libraries and a file written by either loads in the other.
(Qwen2-MoE itself is not in PEFT's list, so there ``"all-linear"`` leaves its experts out, as in PEFT.)

Where ``"all-linear"`` does leave fused experts out, :func:`warn_left_out` says which and how to add them.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from torch import nn

from lorakit.config import PeftType
from lorakit.errors import ConfigError
from lorakit.targeting import ALL_LINEAR, all_linear_suffixes

#: v4 module name -> v5 parameter name, per conversion family (PEFT's ``_MOE_TARGET_MODULE_MAPPING``).
V4_RENAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
#: v5 parameters that fuse several v4 modules (PEFT's ``_MOE_FUSED_TARGETS``).
FUSED: dict[str, dict[str, list[str]]] = {
    "mixtral": {"gate_up_proj": ["w1", "w3"]},
    "qwen2_moe": {"gate_up_proj": ["gate_proj", "up_proj"]},
}
_QWEN2_MOE_FAMILY = (
    "afmoe beam cohere2_moe deepseek_v2 deepseek_v3 deepseek_v32 dots1 ernie4_5_moe exaone_moe flex_olmo glm4_moe "
    "glm4_moe_lite glm4v_moe glm_moe_dsa hunyuan_v1_moe longcat_flash mellum olmoe qwen3_moe qwen3_next qwen3_omni_moe "
    "qwen3_omni_moe_text qwen3_omni_moe_thinker sarvam_mla solar_open Dots3NoteTextModel UnlimitedOcrTextModel"
).split()
#: ``config.model_type`` -> conversion family: the model types PEFT 0.21.2 rewrites configs for with transformers
#: 5.24 (transformers' ``_MODEL_TO_CONVERSION_PATTERN`` entries of these two families, plus Mixtral itself).
MOE_FAMILIES: dict[str, str] = {
    "mixtral": "mixtral",
    "minimax": "mixtral",
    "minimax_m2": "mixtral",
    **dict.fromkeys(_QWEN2_MOE_FAMILY, "qwen2_moe"),
}


def convert_moe_targets(model: nn.Module, config: Any) -> None:
    """Rewrite ``config`` in place as PEFT does for MoE models converted from transformers v4 (module docstring).

    Only a list of names or ``"all-linear"`` is rewritten (a regex is left as it is), and only when it names a v4
    module: other configs are left alone. ``target_modules=None`` with ``target_parameters`` becomes ``[]`` on these
    models, as in PEFT (the parameters alone are adapted).

    Raises:
        ConfigError: half of a fused pair is named without the other (``w1`` without ``w3``).
    """
    family = MOE_FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    targets = config.target_modules
    if family is None:
        return
    if targets is None:
        if config.target_parameters:
            config.target_modules = []
        return
    renames = V4_RENAMES[family]
    if targets == ALL_LINEAR:
        targets = sorted(set(all_linear_suffixes(model)) | set(renames))
    elif isinstance(targets, str):
        return
    kept, parameters, found = [], list(config.target_parameters or []), set()
    for target in targets:
        old = next((o for o in renames if target == o or target.endswith("." + o)), None)
        if old is None:
            kept.append(target)
            continue
        found.add(old)
        if renames[old] not in parameters:
            parameters.append(renames[old])
    if not found:
        return
    for fused, halves in FUSED[family].items():
        present = found & set(halves)
        if present and len(present) < len(halves):
            raise ConfigError(
                f"target_modules names {sorted(present)} but not {sorted(set(halves) - present)}: in transformers 5 "
                f"they are fused into one parameter, {fused!r}, so adapt both or neither (as PEFT requires)"
            )
        if present:
            key = rf".*\.{re.escape(fused)}"
            config.rank_pattern = {**(config.rank_pattern or {}), key: config.r * len(halves)}
            config.alpha_pattern = {**(config.alpha_pattern or {}), key: config.lora_alpha * len(halves)}
    config.target_modules = kept
    config.target_parameters = sorted(parameters)


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the model's fused expert parameters and router weights, in model order.

    An experts module is one with an integer ``num_experts`` holding 3-D parameters whose first dimension is
    ``num_experts`` (transformers 5's ``*Experts`` modules); a router is a sibling of one (same parent) that is not an
    ``nn.Linear`` and holds a 2-D ``weight`` with ``num_experts`` rows.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(module, nn.Linear):
            continue
        stacked = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == experts]
        if not stacked:
            continue
        found += [f"{name}.{n}" if name else n for n in stacked]
        parent = name.rpartition(".")[0]
        siblings = model.get_submodule(parent).named_children() if name else ()
        for child, sibling in siblings:
            weight = sibling._parameters.get("weight") if not isinstance(sibling, nn.Linear) else None
            if weight is not None and weight.dim() == 2 and weight.shape[0] == experts:
                found.append(f"{parent}.{child}.weight" if parent else f"{child}.weight")
    return found


def target_parameter_names(full_names: list[str]) -> list[str]:
    """The ``target_parameters`` entries that select these parameters in every layer: the part after the layer
    index (``model.layers.3.mlp.experts.down_proj`` -> ``mlp.experts.down_proj``), else the last two parts."""
    out: list[str] = []
    for name in full_names:
        match = re.match(r".*?\.\d+\.(.+)$", name)
        short = match.group(1) if match else ".".join(name.split(".")[-2:])
        if short not in out:
            out.append(short)
    return out


def warn_left_out(model: nn.Module, config: Any, adapted: set[str]) -> None:
    """With ``target_modules="all-linear"``, warn about the fused expert parameters and routers it leaves out
    (those not in ``adapted``, full parameter names), naming them and the ``target_parameters`` that add them."""
    if config.target_modules != ALL_LINEAR:
        return
    left = [n for n in fused_expert_parameters(model) if n not in adapted]
    if not left:
        return
    names = target_parameter_names(left)
    how = (
        f"To adapt them too, add target_parameters={names!r} (a stack of E experts gets rank r for each: "
        "E·r·(in + out) values)"
        if getattr(config, "peft_type", None) == PeftType.LORA
        else f"LoRA adapts them with target_parameters={names!r}; {config.peft_type.value} adapters cannot"
    )
    warnings.warn(
        f"target_modules='all-linear' adapts nn.Linear layers only: it leaves out {len(left)} parameters of "
        f"{type(model).__name__} that hold fused MoE experts and routers ({', '.join(names)}), which are "
        f"nn.Parameters, not nn.Linear layers. {how}",
        UserWarning,
        stacklevel=6,
    )
