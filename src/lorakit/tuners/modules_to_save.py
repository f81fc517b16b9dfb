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
    if not config.modules_to_save:
        return
    wanted = config.modules_to_save
    targets = [(name, module) for name, module in model.named_modules() if name and is_module_to_save(name, wanted)]
    for name, module in targets:
        if isinstance(module, _CONTAINERS):
            entry = next(m for m in config.modules_to_save if name.endswith(m))
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
        matched.update(m for m in config.modules_to_save if name.endswith(m))
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
    unmatched = [m for m in config.modules_to_save if m not in matched and m not in task_heads]
    if unmatched:
        raise ConfigError(
            f"modules_to_save entry {unmatched[0]!r} matched no module; give the names (or name endings) of "
            "modules to train in full, e.g. ['classifier'] or ['lm_head']"
            + suggest(unmatched[0], {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        )


def inside_adapter_layer(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` of ``model`` sits inside an adapter layer (a base layer, a copy)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer) for i in range(1, len(parts)))
