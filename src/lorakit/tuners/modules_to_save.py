"""``modules_to_save``: an adapter's own trainable copy of whole modules (a new classifier head, ``lm_head``), the
same for every method and both engines (:class:`~lorakit.tuners.base.Tuner` calls :func:`add_modules_to_save`).

The copies live in :class:`~lorakit.layers.ModulesToSaveWrapper`, PEFT's layout, so state-dict keys and files
match PEFT's.
"""

from __future__ import annotations

from torch import nn

from lorakit.config import TASK_HEADS, PeftConfig
from lorakit.errors import ConfigError, suggest
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper
from lorakit.layers.base import ActiveAdapters
from lorakit.targeting import is_module_to_save
from lorakit.tuners.tying import is_tied_entry, weight_tying_plan

#: Containers run nothing themselves: a copy of one could not stand in for it (PEFT refuses them too).
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def add_modules_to_save(model: nn.Module, active: ActiveAdapters, adapter_name: str, config: PeftConfig) -> None:
    """Give ``adapter_name`` its own trainable copy of every module of ``model`` that ``config.modules_to_save``
    names; new wrappers follow ``active`` (the model's active adapters).

    Raises:
        ConfigError: an entry names a container (``ModuleDict``, ``ModuleList``, ``ParameterDict``,
            ``ParameterList``: no forward of its own to run a copy of, as PEFT refuses too), or matches no
            module. Raised before any module is wrapped.
    """
    tying = weight_tying_plan(model, config)  # PEFT's warnings about tied embeddings come from here, once
    wanted = list(config.modules_to_save or [])
    if tying.modules:  # the embedding gets the copy; the tied head shares its weight (below)
        wanted = [m for m in wanted if not is_tied_entry(m, tying.modules)] + [tying.embedding]
    if not wanted:
        return
    targets = [(name, module) for name, module in model.named_modules() if name and is_module_to_save(name, wanted)]
    for name, module in targets:
        if isinstance(module, _CONTAINERS):
            entry = next(m for m in wanted if name.endswith(m))
            child = next((n for n, _ in module.named_children()), "0")
            inside = (
                f"the modules inside it (e.g. {name.rsplit('.', 1)[-1]}.{child})"
                if isinstance(module, (nn.ModuleDict, nn.ModuleList))
                else "the module that uses its parameters"
            )
            raise ConfigError(
                f"modules_to_save entry {entry!r} names {name!r}, a torch.nn.{type(module).__name__}: a container "
                f"with no forward of its own, whose copy could not run in its place. Name modules that run "
                f"instead: {inside}, or a head such as 'lm_head' or 'classifier'"
            )
    matched: set[str] = set()
    for name, module in targets:
        matched.update(m for m in wanted if name.endswith(m))
        if isinstance(module, ModulesToSaveWrapper):
            module.add(adapter_name)
        elif isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
            continue
        elif inside_adapter_layer(model, name):
            continue
        else:
            wrapper = ModulesToSaveWrapper(module)
            wrapper.add(adapter_name)
            wrapper.follow(active)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    task_heads = TASK_HEADS.get(config.task_type, [])
    unmatched = [m for m in config.modules_to_save or [] if m not in matched and m not in task_heads]
    unmatched = [m for m in unmatched if not (tying.modules and is_tied_entry(m, tying.modules))]
    if unmatched:
        raise ConfigError(
            f"modules_to_save entry {unmatched[0]!r} matched no module; give the names (or name endings) of "
            "modules to train in full, e.g. ['classifier'] or ['lm_head']"
            + suggest(unmatched[0], {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        )
    for name in tying.modules:
        _tie_head_copy(model, active, adapter_name, tying.embedding, name)


def _tie_head_copy(model: nn.Module, active: ActiveAdapters, adapter_name: str, embedding: str, name: str) -> None:
    """Give adapter ``adapter_name`` a copy of the tied head ``name`` whose weight *is* the embedding copy's weight
    (``ensure_weight_tying``; PEFT's ``modules_to_tie``), so training the one trains the other.

    Raises:
        ConfigError: the embedding or the head is already another adapter layer (LoRA on it), or the head is not
            an ``nn.Linear``.
    """
    source = model.get_submodule(embedding)
    if not isinstance(source, ModulesToSaveWrapper) or adapter_name not in source.modules_to_save:
        raise ConfigError(
            f"ensure_weight_tying=True ties {name!r} to the trainable copy of the input embedding {embedding!r} "
            f"(modules_to_save), but the embedding holds a {type(source).__name__} instead; do not target it with "
            "the adapter too"
        )
    module = model.get_submodule(name)
    if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
        raise ConfigError(
            f"{name!r} shares the input embedding's weight and ensure_weight_tying=True ties its copy to the "
            f"embedding's (modules_to_save), but it already holds a {type(module).__name__}; do not target it "
            "with the adapter too"
        )
    head = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
    if type(head) is not nn.Linear:
        raise ConfigError(
            f"ensure_weight_tying ties an output head that is a torch.nn.Linear; {name!r} is a {type(head).__name__}"
        )
    weight = source.modules_to_save[adapter_name].weight
    tied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    tied.weight = weight
    if head.bias is not None:
        tied.bias = nn.Parameter(head.bias.detach().clone())
    if not isinstance(module, ModulesToSaveWrapper):
        module = ModulesToSaveWrapper(module)
        module.follow(active)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    module.add(adapter_name, tied)


def inside_adapter_layer(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` of ``model`` sits inside an adapter layer (a base layer, a copy)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer) for i in range(1, len(parts)))
