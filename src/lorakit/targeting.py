"""Which modules of a model an adapter config selects. Pure functions over module names.

``pattern_value`` (the rule of ``rank_pattern``/``alpha_pattern``) lives in :mod:`lorakit.config`.

Matching rules (the same as PEFT's, so a config selects the same modules in both libraries):

* ``target_modules`` as a list: a module matches if its full name equals an entry or ends with ``"." + entry``.
* ``target_modules`` as a string: a regex that must match the full module name (``re.fullmatch``).
* ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the model's output head, expanded to name suffixes.
* ``exclude_modules``: the same rules; excluded names never match.
* ``layers_to_transform``: only names whose layer index (the number after ``layers_pattern``, or the first
  ``.name.<n>.`` segment when no pattern is set) is listed.
* ``modules_to_save``: a module name that *ends with* an entry (plain string suffix, as PEFT does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from lorakit.config import PeftConfig
from lorakit.errors import ConfigError, TargetNotFoundError, suggest

ALL_LINEAR = "all-linear"


def matches_selector(name: str, selector: list[str] | str) -> bool:
    """Whether module ``name`` is selected by a list of names/suffixes or by a full-match regex."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == s or name.endswith("." + s) for s in selector)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The transformer-block index in a module name, e.g. 3 in ``model.layers.3.self_attn.q_proj``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(match.group(1)) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def is_module_to_save(name: str, modules_to_save: Iterable[str] | None) -> bool:
    return bool(modules_to_save) and any(name.endswith(m) for m in modules_to_save)


def resolve_target_modules(model: nn.Module, config: PeftConfig) -> list[str] | str:
    """``config.target_modules`` made concrete: the architecture default for None, suffixes for all-linear.

    Raises:
        ConfigError: None was given and the architecture has no known default.
    """
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = getattr(config, "DEFAULT_TARGETS", {})
        if model_type not in defaults:
            raise ConfigError(
                f"target_modules is None and lorakit has no default targets for model_type={model_type!r}; "
                "set target_modules to a list of module names, a regex, or 'all-linear'"
            )
        return list(defaults[model_type])
    if targets == ALL_LINEAR:
        return all_linear_suffixes(model)
    return targets


def all_linear_suffixes(model: nn.Module) -> list[str]:
    """Last name components of every Linear/Conv1D, minus that of the output head (``lm_head``, …).

    Modules lorakit inserted are seen as what they wrap: an adapted ``q_proj`` still counts as the linear
    ``q_proj``, and the modules inside an adapter layer (``base_layer``, ``lora_A.default``, ...) are not
    models' layers at all, so a second ``"all-linear"`` adapter selects the same modules as the first.
    """
    from lorakit.layers.base import AdapterLayer
    from lorakit.layers.kinds import HFConv1D

    linear_types: tuple[type, ...] = (nn.Linear,) if HFConv1D is None else (nn.Linear, HFConv1D)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    suffixes: set[str] = set()
    inside: set[int] = set()
    head_names: set[str] = set()
    for name, module in model.named_modules():
        if not name or id(module) in inside:
            continue
        seen_as = module
        if isinstance(module, AdapterLayer):
            inside.update(id(m) for m in module.modules() if m is not module)
            seen_as = module.original()
        if seen_as is head or module is head:
            head_names.add(name.rsplit(".", 1)[-1])
        elif isinstance(seen_as, linear_types):
            suffixes.add(name.rsplit(".", 1)[-1])
    return sorted(suffixes - head_names)


def select_targets(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules ``config`` adapts, in model order (wrappers lorakit inserted are looked through).

    Raises:
        TargetNotFoundError: nothing matched; the message lists module names close to what was asked for.
    """
    from lorakit.layers.base import AdapterLayer

    targets = resolve_target_modules(model, config)
    layers = getattr(config, "layers_to_transform", None)  # a field of some methods only (LoRA's, not IA³'s)
    wrapped_inner: set[int] = set()
    chosen = []
    for name, module in model.named_modules():
        if not name or id(module) in wrapped_inner:
            continue
        if isinstance(module, AdapterLayer):
            wrapped_inner.update(id(m) for m in module.modules() if m is not module)
        if config.exclude_modules and matches_selector(name, config.exclude_modules):
            continue
        if config.modules_to_save and any(
            re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save
        ):
            continue
        if not matches_selector(name, targets):
            continue
        if layers is not None and not isinstance(targets, str):
            if layer_index(name, getattr(config, "layers_pattern", None)) not in layers:
                continue
        chosen.append(name)
    if not chosen:
        raise TargetNotFoundError(_nothing_matched(model, config, targets))
    return chosen


def _nothing_matched(model: nn.Module, config: PeftConfig, targets: list[str] | str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    asked = [targets] if isinstance(targets, str) else targets
    hints = "".join(suggest(t, leaves) for t in asked if isinstance(t, str))
    extra = ""
    if getattr(config, "layers_to_transform", None) is not None:
        extra = f" within layers_to_transform={config.layers_to_transform} (layers_pattern={config.layers_pattern!r})"
    shown = ", ".join(leaves[:30]) + (" ..." if len(leaves) > 30 else "")
    return (
        f"target_modules={targets!r} matched no module of {type(model).__name__}{extra}{hints} "
        f"Module names in this model: {shown}"
    )
