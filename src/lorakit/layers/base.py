"""What every adapter layer of every method shares: :class:`AdapterLayer` (found by type, never by name) and the
model-wide :class:`ActiveAdapters` that all of a model's layers read."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, MergeError
from lorakit.layers.kinds import LayerKind, kind_for
from lorakit.layers.routing import BASE_ROW

#: Versions of active sets, unique across threads (``next`` on a count is atomic): two switches at once never
#: produce the same version for different names.
_VERSIONS = itertools.count(1)


class ActiveAdapters:
    """The active adapters of one model: a single object that all of the model's adapter layers read.

    ``set_adapter`` replaces ``state``, the pair ``(names, version)``, in one assignment (a reader in another
    thread sees the old pair or the new one, never a mix); each layer works out its own active list (the names
    it holds, in order) on its next forward. A switch therefore costs the same on a model of 10 or 10,000 adapter
    layers and touches no weight. A layer told directly what to run (:meth:`AdapterLayer.set_active`) stops
    following this object.
    """

    __slots__ = ("state", "detached")

    def __init__(self, names: list[str] | tuple[str, ...] = ()) -> None:
        self.state: tuple[tuple[str, ...], int] = (tuple(names), 0)
        self.detached = 0  # layers that stopped following since the last set_adapter

    @property
    def names(self) -> tuple[str, ...]:
        return self.state[0]

    @property
    def version(self) -> int:
        return self.state[1]

    def set(self, names: list[str] | tuple[str, ...]) -> None:
        self.state = (tuple(names), next(_VERSIONS))


class AdapterLayer(nn.Module):
    """Marker base for every module that lorakit inserts into a model (found by type, never by name).

    ``active_adapters`` is the layer's own list when it was set on the layer, otherwise the model-wide
    :class:`ActiveAdapters` it follows, filtered to the adapters it holds (recomputed only when that object or
    the layer's adapters change: ``adapters_stamp``). The cache is one tuple ``(version, stamp, list)``, stored
    in one assignment, so a thread never pairs one version's key with another's list.
    """

    adapters_stamp = 0  # bumped whenever an adapter is added, removed or reshaped (caches key on it)

    @property
    def active_adapters(self) -> list[str]:
        state = self.__dict__
        source = state.get("_active_source")
        if source is None:
            return state.setdefault("_own_active", [])
        names, version = source.state
        stamp = self.adapters_stamp
        cached = state.get("_active_cache")
        if cached is not None and cached[0] == version and cached[1] == stamp:
            return cached[2]
        held = self.adapter_names()
        active = self._runnable([a for a in names if a in held])
        state["_active_cache"] = (version, stamp, active)
        return active

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        source = self.__dict__.get("_active_source")
        if source is not None:
            source.detached += 1
        self.__dict__["_active_source"] = None
        self.__dict__["_own_active"] = list(names)

    def follow(self, source: ActiveAdapters) -> None:
        """Take the active adapters from ``source`` (shared by every layer of a model) from now on."""
        self.__dict__["_active_source"] = source
        self.__dict__.pop("_active_cache", None)

    @property
    def selected_adapters(self) -> list[str]:
        """The adapters this layer is told to run (the model's active set, or its own list), whether it holds them
        or not: what PEFT's layers report as their ``active_adapters`` (:func:`lorakit.get_layer_status`)."""
        source = self.__dict__.get("_active_source")
        return list(source.names) if source is not None else list(self.__dict__.get("_own_active", []))

    def _runnable(self, held_active: list[str]) -> list[str]:
        """Of the active adapters this layer holds, those it applies (all of them; one for a module copy)."""
        return held_active

    def set_active(self, adapters: list[str]) -> None:
        """Apply these adapters (those this layer holds) here, whatever the model-wide choice."""
        held = self.adapter_names()
        self.active_adapters = self._runnable([a for a in adapters if a in held])

    def _forget(self, adapter: str) -> None:
        """After deleting ``adapter``: a list of this layer's own no longer names it."""
        self.adapters_stamp += 1
        if self.__dict__.get("_active_source") is None:
            self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as in PEFT's files (relative to this module, without the name)."""
        raise NotImplementedError

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        """The ``state_dict`` key (relative to this module) of a tensor named ``file_key`` in the file."""
        raise NotImplementedError

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def delete(self, adapter: str) -> None:
        raise NotImplementedError

    def original(self) -> nn.Module:
        """The module this wrapper replaced."""
        raise NotImplementedError


class WeightLayer(AdapterLayer):
    """An adapter layer that wraps a base layer and can merge into its weight (LoRA's, IA³'s, ...).

    Subclasses hold ``base_layer``, ``kind`` and ``merged_adapters`` and say what a merge computes
    (:meth:`merged_result`); the checks every merge makes (which adapters are pending, a quantized base refused,
    the all-or-nothing dry run of ``safe_merge``) and swapping the base (dequantize, quantize) are shared here.
    """

    base_layer: nn.Module
    kind: LayerKind
    merged_adapters: list[str]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merged_result(self, adapter_names: list[str]) -> Any:
        """Compute what merging ``adapter_names`` would write, out of place; raise :class:`MergeError` on NaN/Inf."""
        raise NotImplementedError

    def _pending(self, adapter_names: list[str] | None) -> list[str]:
        """Of ``adapter_names`` (default: the active ones), those this layer holds and has not merged: in order,
        each once."""
        held = self.adapter_names()
        names = self.active_adapters if adapter_names is None else [a for a in adapter_names if a in held]
        return list(dict.fromkeys(a for a in names if a not in self.merged_adapters))

    def refuse_quantized_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` here would have to requantize the base weight."""
        self._refuse_quantized(self._pending(adapter_names))

    def _refuse_quantized(self, pending: list[str]) -> None:
        if self.kind.quantized and pending:
            raise MergeError(
                f"the base layer is quantized ({type(self.base_layer).__name__}): merging into it would requantize "
                "the weight, a lossy step lorakit never takes silently. Use merge_and_unload(), which dequantizes "
                "to a plain nn.Linear first, or keep the adapter unmerged"
            )

    @torch.no_grad()
    def check_merge(
        self, adapter_names: list[str] | None = None, dequantize: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        """Raise :class:`MergeError` where merging ``adapter_names`` here would fail: a quantized base (unless
        ``dequantize``: then the merge is computed on a transient dequantized copy in ``dtype``, as
        ``merge_and_unload`` would make it), or NaN/Inf in the result. Changes nothing, keeps nothing: memory for
        one layer's merged weight at a time."""
        pending = self._pending(adapter_names)
        if not pending:
            return
        if not self.kind.quantized:
            self.merged_result(pending)
            return
        if not dequantize:
            self._refuse_quantized(pending)
        base, kind = self.base_layer, self.kind
        try:
            self.dequantize(dtype)
            self.merged_result(pending)
        finally:
            self.base_layer, self.kind = base, kind

    def dequantize(self, dtype: torch.dtype | None = None) -> None:
        """Replace a quantized base layer by a plain ``nn.Linear`` holding its dequantized weight (in ``dtype``,
        default the layer's compute dtype); nothing happens for an unquantized base."""
        if self.kind.quantized:
            self.replace_base(self.kind.dequantize(self.base_layer, dtype))

    def replace_base(self, base_layer: nn.Module) -> None:
        """Hold ``base_layer`` (same features: a quantized or dequantized version of the old one) from now on."""
        self.base_layer = base_layer
        self.kind = self._kind_for(base_layer)

    def _kind_for(self, base_layer: nn.Module) -> LayerKind:
        """The kind this layer holds for ``base_layer`` (a method may extend the geometry, as LoRA does)."""
        return kind_for(base_layer)


#: Longest adapter name: it becomes a folder name (255 bytes on common file systems) and a key in every layer.
MAX_ADAPTER_NAME = 128
#: Attributes of the containers that hold adapters by name: an adapter called ``keys`` or ``training`` would
#: shadow them (torch refuses such keys half-way through building an adapter).
_CONTAINER_ATTRIBUTES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))


def check_adapter_name(name: Any) -> None:
    """Refuse a name that cannot be a module key and a folder name, before anything is built under it.

    Raises:
        ConfigError: naming the problem and what is accepted.
    """
    accepted = (
        f"use a non-empty string of at most {MAX_ADAPTER_NAME} characters without '.', '/', '\\' or control "
        "characters, such as 'default' or 'sql-v2'"
    )
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter name {name!r} is invalid; {accepted}")
    if len(name) > MAX_ADAPTER_NAME or len(name.encode("utf-8", "surrogatepass")) > 255:
        raise ConfigError(f"adapter name of {len(name)} characters is too long; {accepted}")
    bad = [c for c in name if c in "./\\" or not c.isprintable()]
    if bad:
        raise ConfigError(f"adapter name {name!r} holds {bad[0]!r}; {accepted} (it becomes a module key and a folder)")
    if name == BASE_ROW:
        raise ConfigError(
            f"adapter name {name!r} is reserved: in adapter_names it means 'the base model, no adapter'; pick another"
        )
    if name in _CONTAINER_ATTRIBUTES:
        raise ConfigError(
            f"adapter name {name!r} is the name of an attribute of torch's module containers, which hold adapters "
            f"by name; pick another, e.g. {name + '_adapter'!r}"
        )
