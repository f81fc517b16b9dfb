"""Which parameters a LoRA config's ``target_parameters`` selects (PEFT's rule), and giving them an adapter.

Matching: a parameter ``p`` of the module at ``m`` (seen through lorakit's layers: ``.base_layer`` parts taken out) is
selected when ``m.p`` equals an entry of ``target_parameters`` or ends with ``"." + entry``; modules are visited in
model order and each one's own parameters in registration order, which fixes how the layers of two parameters of one
module nest (:mod:`lorakit.tuners.lora.param_wrapper`). ``rank_pattern`` and ``alpha_pattern`` match ``m.p``.
``layers_to_transform`` and ``exclude_modules`` do not apply to parameters (as in PEFT).

Every check runs in :func:`lora_targets`, before the model changes; :func:`inject_parameters` then adds the layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from lorakit.config import PeftType, pattern_value
from lorakit.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError, suggest
from lorakit.layers.base import AdapterLayer
from lorakit.layers.kinds import kind_for
from lorakit.targeting import select_targets
from lorakit.tuners.lora.moe import MOE_FAMILIES, V4_RENAMES, target_parameter_names, warn_left_out
from lorakit.tuners.lora.param_names import strip_wrappers
from lorakit.tuners.lora.param_wrapper import ParamLoraLayer, check_parameter_options

if TYPE_CHECKING:
    from lorakit.tuners.base import BaseTuner


@dataclass(frozen=True)
class ParameterTarget:
    """One selected parameter: ``site`` is where its layer goes (the holding module's name, wrappers taken out),
    ``parameter`` its name on that module, ``key`` = ``site.parameter`` (what the config's patterns match)."""

    site: str
    parameter: str
    key: str


def _holders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(site, module)`` for every module that can hold a targeted parameter, in model order: modules inside
    lorakit's layers are seen through their ``base_layer`` only (not factors, not ``modules_to_save`` copies)."""
    inside: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, AdapterLayer):
            base = getattr(module, "base_layer", None)
            for child in module.children():
                if child is not base:
                    inside.update(id(m) for m in child.modules())
            continue
        out.append((strip_wrappers(name), module))
    return out


def _nothing_matched(model: nn.Module, unmatched: list[str], holders: list[tuple[str, nn.Module]]) -> str:
    keys = [
        f"{site}.{n}" if site else n
        for site, module in holders
        for n, p in module.named_parameters(recurse=False)
        if p.dim() in (2, 3) and kind_for(module) is None  # a Linear's, Embedding's or Conv's weight: target_modules
    ]
    candidates = target_parameter_names(keys)
    suffixes = {".".join(k.split(".")[-2:]) for k in keys} | set(candidates)
    hints = "".join(suggest(name, suffixes) for name in unmatched)
    shown = ", ".join(candidates[:30]) + (" ..." if len(candidates) > 30 else "")
    listed = (
        f"Parameters that target_parameters can adapt (2-D/3-D, outside nn.Linear, Embedding and Conv layers, which "
        f"target_modules adapts): {shown}"
        if candidates
        else "This model has no 2-D or 3-D parameter outside nn.Linear, Embedding and Conv layers; adapt its layers "
        "with target_modules"
    )
    return (
        f"target_parameters entries {unmatched!r} matched no parameter of {type(model).__name__} (an entry matches "
        f"a parameter's full name or its ending after a '.'){hints}. {listed}"
    )


def select_parameters(model: nn.Module, config: Any, module_targets: list[str] = ()) -> list[ParameterTarget]:
    """The parameters ``config.target_parameters`` selects, in PEFT's order (see the module docstring).

    Args:
        module_targets: the modules this config adapts through ``target_modules`` (a parameter of one of them
            cannot be adapted as well).

    Raises:
        ConfigError: an entry matches no parameter (naming it and listing parameter names that can be targeted; the
            names PEFT adds itself on MoE models, ``gate.weight`` and so on, only warn), a parameter of the top-level
            module or of a module that ``target_modules`` adapts.
        UnsupportedModuleError: a selected parameter is not 2-D or 3-D.
    """
    wanted = sorted(set(config.target_parameters or ()))
    holders = _holders(model)
    found: list[ParameterTarget] = []
    matched: set[str] = set()
    adapted_modules = set(module_targets)
    for site, module in holders:
        for name, param in module.named_parameters(recurse=False):
            key = f"{site}.{name}" if site else name
            hits = [t for t in wanted if key == t or key.endswith("." + t)]
            if not hits:
                continue
            matched.update(hits)
            if not site:
                raise ConfigError(
                    f"target_parameters selects {name!r}, a parameter of the top-level model {type(model).__name__}; "
                    "only parameters of its submodules can be adapted (as in PEFT)"
                )
            current = model.get_submodule(site)
            if site in adapted_modules or (
                isinstance(current, AdapterLayer) and not isinstance(current, ParamLoraLayer)
            ):
                raise ConfigError(
                    f"target_parameters selects {key!r} but module {site!r} is adapted through target_modules (or "
                    "modules_to_save); a module is adapted one way: drop it from target_modules or drop the parameter"
                )
            if param.dim() not in (2, 3):
                raise UnsupportedModuleError(
                    f"target_parameters selects {key!r} of shape {tuple(param.shape)}; accepted: 2-D (out, in) "
                    "weights and 3-D (experts, out, in) stacks of them"
                )
            found.append(ParameterTarget(site, name, key))
    unmatched = [t for t in wanted if t not in matched]
    family = MOE_FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    peft_added = set(V4_RENAMES[family].values()) if family else set()
    if unmatched and (not found or set(unmatched) - peft_added):
        raise ConfigError(_nothing_matched(model, [t for t in unmatched if t not in peft_added or not found], holders))
    if unmatched:
        warnings.warn(
            f"target_parameters entries {unmatched!r} (added for this MoE architecture, as PEFT adds them) matched no "
            f"parameter of {type(model).__name__}",
            UserWarning,
            stacklevel=6,
        )
    return found


def lora_targets(tuner: BaseTuner, config: Any) -> list[str]:
    """The modules a LoRA config adapts through ``target_modules``, once every ``target_parameters`` check passed.

    With ``target_parameters``, ``target_modules`` may match nothing (``[]``, or None on an architecture without
    default targets): the parameters are the adapter. With ``target_modules="all-linear"``, warns about the fused MoE
    parameters it leaves out (:func:`~lorakit.tuners.lora.moe.warn_left_out`).

    Raises:
        TargetNotFoundError: neither the modules nor (without ``target_parameters``) anything else matched.
        ConfigError: see :func:`select_parameters`; options a parameter cannot take (dropout, DoRA, ``lora_bias``,
            other initialisations); another adapter targets a different set of parameters (PEFT's rule: which
            parameter a file's tensors belong to is their layers' nesting, the same for every adapter).
    """
    model = tuner.model
    if not config.target_parameters:
        modules = select_targets(model, config)
        warn_left_out(model, config, set())
        return modules
    if config.peft_type != PeftType.LORA:
        raise ConfigError(f"target_parameters is a LoRA option; {config.peft_type.value} adapters adapt modules only")
    check_parameter_options(config.lora_dropout, config.init_lora_weights, config.use_dora)
    for field in ("fan_in_fan_out", "lora_bias"):
        if getattr(config, field, False):
            raise ConfigError(f"{field}=True cannot be used with target_parameters (as in PEFT); set it to False")
    for name, other in tuner.peft_config.items():
        theirs = getattr(other, "target_parameters", None)
        if other is not config and theirs and set(theirs) != set(config.target_parameters):
            raise ConfigError(
                "adapters with target_parameters must all target the same parameters (as in PEFT): got "
                f"{sorted(config.target_parameters)} for the new adapter and {sorted(theirs)} for adapter {name!r}"
            )
    modules: list[str] = []
    if config.target_modules != []:
        try:
            modules = select_targets(model, config)
        except TargetNotFoundError as exc:
            warnings.warn(f"{exc}; only target_parameters are adapted", UserWarning, stacklevel=5)
        except ConfigError:  # None on an architecture without default targets: the parameters alone
            if config.target_modules is not None:
                raise
    chosen = select_parameters(model, config, modules)
    warn_left_out(model, config, {t.key for t in chosen})
    return modules


def _wrapper_of(module: nn.Module, parameter: str) -> ParamLoraLayer | None:
    """The layer among those wrapped around a module that adapts ``parameter``, if any."""
    while isinstance(module, ParamLoraLayer):
        if module.parameter_name == parameter:
            return module
        module = module.base_layer
    return None


def inject_parameters(tuner: BaseTuner, adapter_name: str, config: Any) -> None:
    """Give every parameter ``config.target_parameters`` selects adapter ``adapter_name``: added to the layer that
    already adapts it, or in a new :class:`ParamLoraLayer` around whatever sits at the module's place.

    Raises:
        AdapterExistsError: a layer already holds an adapter of that name. (The checks of :func:`lora_targets` ran.)
    """
    if not config.target_parameters:
        return
    model = tuner.model
    for target in select_parameters(model, config):
        current = model.get_submodule(target.site)
        layer = _wrapper_of(current, target.parameter) or ParamLoraLayer(current, target.parameter)
        layer.add(
            adapter_name,
            pattern_value(config.rank_pattern, target.key, config.r),
            pattern_value(config.alpha_pattern, target.key, config.lora_alpha),
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            dtype=tuner._adapter_dtype(layer),
        )
        if layer is not current and layer.base_layer is current:
            tuner._replace(target.site, layer)
