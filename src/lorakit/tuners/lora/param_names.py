"""Names around ``target_parameters``, from strings alone (no model): what a config and a file's keys can say.

A parameter adapted with ``target_parameters`` is named by the module holding it and its own name
(``model.layers.0.mlp.experts.gate_up_proj``); its factors sit in a layer at that module's place, or nested one
``base_layer`` deeper for a module's second adapted parameter (``...experts.base_layer.lora_A.weight``), as in PEFT's
files. Their ``lora_A`` holds ``E·r`` rows (r per expert), so a file's rank check needs these names.
"""

from __future__ import annotations

from typing import Any

from lorakit.config import pattern_value

WRAPPER = ".base_layer"


def strip_wrappers(name: str) -> str:
    """``name`` without the ``.base_layer`` parts that adapter layers insert (PEFT's rule for matching parameters)."""
    while WRAPPER in name:
        head, _, tail = name.rpartition(WRAPPER)
        name = head + tail
    return name


def parameter_ranks(config: Any, module: str) -> list[int]:
    """The ranks ``config`` gives the ``target_parameters`` that module ``module`` (a file key's module part, wrappers
    included) may hold; empty when it can hold none of them. Each parameter's ``lora_A`` has a multiple of its rank
    as rows (one rank per expert)."""
    if not getattr(config, "target_parameters", None):
        return []
    site = strip_wrappers(module)
    ranks = []
    for target in config.target_parameters:
        holder, _, leaf = target.rpartition(".")
        if not holder or site == holder or site.endswith("." + holder):
            ranks.append(pattern_value(config.rank_pattern, f"{site}.{leaf}", config.r))
    return ranks
