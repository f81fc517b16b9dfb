"""Whole modules trained and saved with an adapter (``modules_to_save``), e.g. a new classification head.

Same layout as PEFT's wrapper, so state-dict keys match: ``original_module`` is the frozen module and
``modules_to_save[name]`` a trainable copy per adapter; the active adapter's copy runs in ``forward``. Only one
copy can run, so, as in PEFT, two adapters that both hold a copy are never active together.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from lorakit.layers.base import AdapterLayer


class ModulesToSaveWrapper(AdapterLayer):
    """Holds the original module and one trainable copy per adapter."""

    #: Adapters whose copy is a tied output head sharing the embedding copy's weight (``ensure_weight_tying``).
    tied_copies: frozenset[str] = frozenset()

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.disable_adapters = False

    def add(self, adapter: str, module: nn.Module | None = None) -> None:
        """Give ``adapter`` a trainable copy of the module, or ``module`` as its copy: a tied output head's, whose
        weight is the embedding copy's own (``ensure_weight_tying``; trained, and listed among the adapter's
        parameters, there)."""
        if adapter in self.modules_to_save:
            raise AdapterExistsError(f"adapter {adapter!r} already has a trainable copy of this module")
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module) if module is None else module
        if module is not None:
            self.tied_copies = self.tied_copies | {adapter}
        self.adapters_stamp += 1

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        if adapter not in self.modules_to_save:
            raise AdapterNotFoundError(f"adapter {adapter!r} has no copy of this module")
        return dict(self.modules_to_save[adapter].state_dict(keep_vars=True))

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        return f"modules_to_save.{adapter}.{file_key}"

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        if adapter in self.tied_copies:  # the embedding copy's weight, listed there
            return [p for n, p in self.modules_to_save[adapter].named_parameters() if n != "weight"]
        return list(self.modules_to_save[adapter].parameters())

    def _runnable(self, held_active: list[str]) -> list[str]:
        return held_active[:1]  # one copy of the module runs (check_active refuses more)

    def check_active(self, adapters: list[str], where: str = "this module") -> None:
        """Raise :class:`ConfigError` if more than one of ``adapters`` holds a copy of this module.

        Args:
            where: the module's name in the model, for the message.
        """
        held = [a for a in dict.fromkeys(adapters) if a in self.modules_to_save]
        if len(held) > 1:
            raise ConfigError(
                f"adapters {held} each keep their own copy of {where!r} (modules_to_save) and only one copy can "
                f"run: activate at most one of them at a time (e.g. set_adapter({held[0]!r})), or keep "
                "modules_to_save on a single adapter"
            )

    def set_active(self, adapters: list[str]) -> None:
        self.check_active(adapters)
        super().set_active(adapters)

    def delete(self, adapter: str) -> None:
        del self.modules_to_save[adapter]
        self.tied_copies = self.tied_copies - {adapter}
        self._forget(adapter)

    def original(self) -> nn.Module:
        return self.original_module

    def active_module(self) -> nn.Module:
        if self.disable_adapters or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    # Heads are often read directly (``model.score.weight``): answer with the active copy's attributes.
    @property
    def weight(self) -> torch.Tensor:
        return self.active_module().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.active_module(), "bias", None)
