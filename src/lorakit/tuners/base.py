"""The engine every weight-based method shares: inject adapter layers (with rollback), switch them, disable,
merge and unload them, ``modules_to_save`` copies and trainable biases, batches that mix adapters.

:class:`BaseTuner` owns the wrapped model (``self.model``) and the dict of adapter configs. A method subclasses
it and says only what is its own: its config class (``config_class``), its layer type (``layer_type``), how a
targeted module becomes (or gains) its layer (:meth:`BaseTuner._create_and_replace`), and what it restores when
an injection fails (:meth:`BaseTuner._before_inject`). Every method finds lorakit's modules by type
(:class:`~lorakit.layers.AdapterLayer`), never by name patterns.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.config import PeftConfig
from lorakit.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    UnsupportedModuleError,
    suggest,
)
from lorakit.kbit import forget_quantization
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper, kind_for
from lorakit.layers.base import ActiveAdapters, WeightLayer, check_adapter_name
from lorakit.layers.kinds import supported_type_names
from lorakit.layers.quantized import guard_model_repacking
from lorakit.layers.routing import BASE_ROW, RowRouting, routed
from lorakit.targeting import select_targets
from lorakit.tuners.modules_to_save import add_modules_to_save, inside_adapter_layer
from lorakit.tuners.trainable_tokens.auxiliary import add_trainable_tokens
from lorakit.undo import offer


def _bias(config: PeftConfig) -> str:
    """Which biases a config trains (``"none"`` for methods without the field)."""
    return getattr(config, "bias", "none")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class Tuner(nn.Module):
    """What :class:`~lorakit.PeftModel` and :mod:`lorakit.persistence` hold as ``base_model``: the original model
    (``self.model``) plus one method's adapters, whatever way the method enters the model.

    Two engines implement it: :class:`BaseTuner` (adapter layers injected into the model's modules) and
    :class:`~lorakit.tuners.prompt_learning.model.PromptLearningModel` (prompts given to the model's inputs).
    Both answer ``inject``, ``set_adapter``, ``active_adapters``, ``adapters_disabled``, ``remove_adapter_layers``,
    ``merge``/``unmerge``/``unload``, ``rows_routed``, ``file_config``/``after_save`` and ``forward``/``generate``.

    Args:
        model: any ``nn.Module`` (usually a transformers ``PreTrainedModel``).
        peft_config: adapter name -> config, shared with the owning :class:`~lorakit.PeftModel`.
        adapter_name: the first adapter, added now and made active.
        autocast_adapter_dtype: keep adapters in fp32 on a 16-bit base (as PEFT does).
    """

    #: The method's config class (a second method's config cannot join this model).
    config_class: ClassVar[type[PeftConfig]]

    def __init__(
        self,
        model: nn.Module,
        peft_config: dict[str, PeftConfig],
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config = peft_config
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._active = ActiveAdapters([adapter_name])  # read by every adapter layer and module copy
        self._setup()
        self.inject(adapter_name, peft_config[adapter_name])
        self.set_adapter(adapter_name)

    def _setup(self) -> None:
        """Make what the engine holds besides the model, before the first adapter is added."""

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails: answer with the wrapped model's attribute (config, generate, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- modules_to_save: whole-module copies, the same for every method -------------------------------

    def _add_modules_to_save(self, adapter_name: str, config: PeftConfig) -> None:
        """Give ``adapter_name`` its own trainable copy of every module ``config.modules_to_save`` names
        (:func:`lorakit.tuners.modules_to_save.add_modules_to_save`)."""
        add_modules_to_save(self.model, self._active, adapter_name, config)

    def _inside_adapter_layer(self, name: str) -> bool:
        return inside_adapter_layer(self.model, name)

    def inject(self, adapter_name: str, config: PeftConfig) -> None:
        raise NotImplementedError

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        raise NotImplementedError

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` on these adapters' parameters, active or not (PEFT's method). Making one trainable
        takes it out of inference mode: from then on :meth:`set_adapter` freezes it while it is inactive, as PEFT."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_adapter(name)
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(requires_grad)
            if requires_grad:
                self.peft_config[name].inference_mode = False


class BaseTuner(Tuner):
    """The model with adapter layers injected; ``self.model`` is the original model object, modified in place.
    Arguments as :class:`Tuner`'s."""

    #: The method's layer type: the adapter layers that hold weights of their own (merge, mixed batches).
    layer_type: ClassVar[type[AdapterLayer]]

    def _setup(self) -> None:
        if any(isinstance(m, AdapterLayer) for m in self.model.modules()):
            warnings.warn(
                "this model already holds lorakit adapter layers (get_peft_model was called on it before); "
                "the new adapter shares the base model with the earlier one. To keep several adapters on one "
                "base, prefer peft_model.add_adapter(name, config) and set_adapter(name).",
                stacklevel=4,
            )

    # -- adapter layers -------------------------------------------------------------------------------

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(name relative to self.model, layer)`` for every lorakit module, outermost first."""
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def weight_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """The method's own layers (``layer_type``), without ``modules_to_save`` copies."""
        for name, module in self.adapter_layers():
            if isinstance(module, self.layer_type):
                yield name, module

    def merging_layers(self) -> Iterator[tuple[str, WeightLayer]]:
        """The layers that merge into base weights: the method's own and auxiliary ones (LoRA's trainable token
        rows, :mod:`lorakit.tuners.trainable_tokens`)."""
        for name, module in self.adapter_layers():
            if isinstance(module, WeightLayer):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active.names)

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active.set(names)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterNotFoundError(
                f"unknown adapter {adapter_name!r}; this model holds {sorted(self.peft_config)}"
                + suggest(adapter_name, self.peft_config)
            )

    # -- injection ------------------------------------------------------------------------------------

    def inject(self, adapter_name: str, config: PeftConfig) -> None:
        """Wrap every module ``config`` selects and give it adapter ``adapter_name``; freeze the rest.

        On any error the model is left as it was.

        Raises:
            TargetNotFoundError: the targets match no module.
            UnsupportedModuleError: a target is of a type the method's layer cannot wrap.
            AdapterExistsError: a targeted layer already holds an adapter of this name.
            ConfigError: a config of another method, or a second adapter asking for trainable biases (only one
                adapter may own them).
        """
        check_adapter_name(adapter_name)
        self._check_config_type(config)
        self._structure_changed()
        bias = _bias(config)
        if bias != "none":
            others = [n for n, c in self.peft_config.items() if n != adapter_name and _bias(c) != "none"]
            if others:
                raise ConfigError(
                    f"adapter {adapter_name!r} has bias={bias!r} but adapter {others[0]!r} already trains "
                    "biases; only one adapter per model may, so use bias='none' for this one"
                )
        plans = [self._plan(name, adapter_name) for name in self._targets(config)]
        undo = self._before_inject(plans, config)
        try:
            for plan in plans:
                self._create_and_replace(plan, adapter_name, config)
            self._add_modules_to_save(adapter_name, config)
            add_trainable_tokens(self.model, self._active, adapter_name, config, self._adapter_dtype)
            self._after_inject(adapter_name, config)
        except BaseException:
            self.remove_adapter_layers(adapter_name)
            undo()
            raise
        offer(undo)  # a load still running keeps it, to put the base back if its file is refused
        self._freeze_all()
        guard_model_repacking(self.model)
        self.set_adapter([a for a in self.active_adapters if a in self.peft_config])

    def _targets(self, config: PeftConfig) -> list[str]:
        """Names of the modules ``config`` adapts: those its ``target_modules`` select (a method whose layers sit
        elsewhere, such as bottleneck adapters after each block's sub-blocks, says where instead)."""
        return select_targets(self.model, config)

    def _plan(self, name: str, adapter_name: str) -> tuple[str, nn.Module, Any]:
        """``(name, module, kind)`` for a targeted module, checked before anything changes.

        Raises:
            UnsupportedModuleError: no layer kind handles the module's type or geometry.
            AdapterExistsError: the module already holds an adapter of this name.
        """
        module = self.model.get_submodule(name)
        held = isinstance(module, self.layer_type)
        base = module.base_layer if held else module
        kind = module.kind if held else self._kind_for(module)
        if kind is None:
            raise UnsupportedModuleError(
                f"target module {name!r} is a {type(module).__module__}.{type(module).__name__}, which "
                f"{self.config_class.NAME} cannot wrap; supported: {supported_type_names()}. Narrow "
                "target_modules to such layers."
            )
        if held and adapter_name in module.adapter_names():
            raise AdapterExistsError(f"module {name!r} already holds an adapter named {adapter_name!r}")
        kind.features(base)  # raises early for unsupported geometry (e.g. grouped convolutions)
        return name, module, kind

    def _kind_for(self, module: nn.Module) -> Any:
        """The kind the method's layer holds for ``module`` (None: it cannot wrap it); LoRA extends the geometry."""
        return kind_for(module)

    def _before_inject(self, plans: list[tuple[str, nn.Module, Any]], config: PeftConfig) -> Callable[[], None]:
        """Keep what the injection may change outside the adapter's own layers; returns what restores it."""
        return lambda: None

    def _create_and_replace(self, plan: tuple[str, nn.Module, Any], adapter_name: str, config: PeftConfig) -> None:
        """Give the planned module adapter ``adapter_name``: add it to the method's layer there, or wrap the module
        in a new one (then put in place with :meth:`_replace`)."""
        raise NotImplementedError

    def _adapter_dtype(self, layer: AdapterLayer) -> torch.dtype:
        """The dtype of a new adapter's parameters: the base weight's, but fp32 for a half-precision or
        quantized base (half-precision adapters lose small updates; PEFT's ``autocast_adapter_dtype``)."""
        dtype = layer.kind.base_weight(layer.base_layer).dtype
        if not dtype.is_floating_point:
            return torch.float32
        if self.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return dtype

    def _replace(self, name: str, layer: AdapterLayer) -> None:
        """Put a new adapter layer where module ``name`` was; it follows the model's active adapters."""
        layer.follow(self._active)
        parent, child = _parent(self.model, name)
        setattr(parent, child, layer)

    def _check_config_type(self, config: PeftConfig) -> None:
        if not isinstance(config, self.config_class) or config.peft_type != self.config_class.PEFT_TYPE:
            raise ConfigError(
                f"this model holds {self.config_class.NAME} adapters; a {config.peft_type.value} adapter cannot join "
                "them (PEFT keeps one method per model as well): load it onto a separate model"
            )

    def _after_inject(self, adapter_name: str, config: PeftConfig) -> None:
        """Called once every layer holds the new adapter (a method may reshape it)."""

    def file_config(self, adapter_name: str, config: PeftConfig) -> PeftConfig:
        """The config as the adapter file holds it (``config`` is a copy the caller owns; changed in place)."""
        return config

    def after_save(self, adapter_name: str, config: PeftConfig, folder: str) -> None:
        """Called once an adapter's files are written into ``folder`` (a method may add a report)."""

    def layer_file_state(self, name: str, layer: AdapterLayer, adapter: str) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for ``layer`` (file key relative to the layer -> tensor)."""
        return layer.adapter_state(adapter)

    def _freeze_all(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)

    def _check_weighted_sources(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """``add_weighted_adapter``'s checks every method shares: a new name, known sources, one finite weight each.

        Raises:
            AdapterExistsError, AdapterNotFoundError, ConfigError: naming the offending argument.
        """
        configs = self.peft_config
        if adapter_name in configs:
            raise AdapterExistsError(f"adapter {adapter_name!r} already exists; pick a new name for the combination")
        if not adapters or isinstance(adapters, str):
            raise ConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
        for name in adapters:
            if name not in configs:
                raise AdapterNotFoundError(
                    f"unknown adapter {name!r}; this model holds {sorted(configs)}" + suggest(name, configs)
                )
        if len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ConfigError(f"weights must be {len(adapters)} finite numbers (one per adapter), got {weights!r}")

    def remove_adapter_layers(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every layer; layers left with no adapter give back their original."""
        self._structure_changed()
        for name, layer in reversed(list(self.adapter_layers())):  # innermost first: nested layers keep their names
            if adapter_name in layer.adapter_names():
                layer.delete(adapter_name)
            if not layer.adapter_names():
                parent, child = _parent(self.model, name)
                setattr(parent, child, layer.original())

    # -- switching ------------------------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make the adapter(s) ``adapter_name`` (PEFT's name: one name or a list) the active ones; only their
        parameters require grad (unless inference_mode; PEFT's ``inference_mode=True`` freezes every adapter).

        Constant time when every adapter is in inference mode (as loaded for serving): the layers all read one
        shared :class:`~lorakit.tuners.lora.layer.ActiveAdapters`, so switching is one assignment, whatever the number
        of layers or adapters, and no weight is touched. Adapters loaded for training also get their parameters'
        ``requires_grad`` set (a walk over those adapters' parameters, as in PEFT); inference-mode adapters stay
        frozen, as injection left them.

        The active set is model-wide state, not per call: switch from one thread at a time, and not while another
        thread runs the model, which would pick up the switch mid-forward. To run several adapters at once from
        several threads, pass ``adapter_names=`` per call (:meth:`rows_routed`), which is thread-safe and does not
        read the active set.

        Raises:
            AdapterNotFoundError: a name this model does not hold.
            ConfigError: two of the adapters keep their own copy of the same module (``modules_to_save``): only
                one copy can run, so at most one of them may be active (PEFT refuses this too).
            The model is left unchanged by either.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_adapter(name)
        if sum(1 for n in dict.fromkeys(names) if self.peft_config[n].modules_to_save) > 1:  # rare: then look closer
            for module_name, layer in self.adapter_layers():
                if isinstance(layer, ModulesToSaveWrapper):
                    layer.check_active(names, module_name)
        trainable = {a for a, c in self.peft_config.items() if not c.inference_mode}
        layers = self._adapter_layer_list() if trainable or self._active.detached else ()
        for layer in layers:
            layer.follow(self._active)  # layers told directly what to run (layer.set_active) follow the model again
            for adapter in layer.adapter_names():
                if adapter in trainable:
                    for param in layer.adapter_parameters(adapter):
                        param.requires_grad_(adapter in names)
        self._active.detached = 0
        self._active.set(names)
        self._set_bias_trainable()
        if inference_mode:
            self.set_requires_grad(list(self.peft_config), requires_grad=False)

    def _set_bias_trainable(self) -> None:
        owners = [n for n in self.active_adapters if _bias(self.peft_config[n]) != "none"]
        config = self.peft_config[owners[0]] if owners else None
        if config is None or config.inference_mode:
            return
        if config.bias == "all":
            wrapped = {
                id(p)
                for _, layer in self.adapter_layers()
                if isinstance(layer, ModulesToSaveWrapper)
                for p in layer.original_module.parameters()
            }
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and id(param) not in wrapped:
                    param.requires_grad_(True)
        else:
            for _, layer in self.weight_layers():
                bias = getattr(layer.base_layer, "bias", None)
                if isinstance(bias, nn.Parameter):
                    bias.requires_grad_(True)

    def _adapter_layer_list(self) -> list[AdapterLayer]:
        """Every adapter layer, remembered until the model's structure changes (inject, remove, unload): switching
        adapters and mixed batches visit them all, and walking a large model's modules each time is slow."""
        cached = self.__dict__.get("_layer_list_cache")
        if cached is None:
            cached = self.__dict__["_layer_list_cache"] = [layer for _, layer in self.adapter_layers()]
        return cached

    def _structure_changed(self) -> None:
        self.__dict__.pop("_layer_list_cache", None)

    # -- PEFT's tuner API: adapter parameters, targeted names, in-place switches -----------------------

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters adapter ``adapter_name`` trains, in every layer holding it (module copies included)."""
        held = [layer for layer in self._adapter_layer_list() if adapter_name in layer.adapter_names()]
        return [param for layer in held for param in layer.adapter_parameters(adapter_name)]

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules holding this method's adapters (names relative to ``self.model``), in model order."""
        return [name for name, _ in self.weight_layers()]

    def disable_adapter_layers(self) -> None:
        """PEFT's in-place switch: the base model alone, every adapter frozen, until :meth:`enable_adapter_layers`
        (:meth:`adapters_disabled` does it for a block). Raises :class:`MergeError` while an adapter is merged."""
        self._refuse_merged()
        if any(_bias(self.peft_config[name]) != "none" for name in self.active_adapters):  # PEFT warns too
            warnings.warn("the active adapter trains biases: they stay in the disabled model", stacklevel=2)
        for layer in self._adapter_layer_list():
            layer.disable_adapters = True
        self.set_requires_grad(list(self.peft_config), requires_grad=False)

    def enable_adapter_layers(self) -> None:
        """Undo :meth:`disable_adapter_layers`: the active adapters run, and train unless in inference mode."""
        for layer in self._adapter_layer_list():
            layer.disable_adapters = False
        self.set_adapter(self.active_adapters)

    @contextlib.contextmanager
    def rows_routed(self, adapter_names: Any, batch: int | None = None, per_token: bool = False) -> Any:
        """Inside the block, row i of every batch goes through adapter ``adapter_names[i]`` (``"__base__"``: none);
        with ``per_token``, token i of the flattened batch (sequences packed in a row; LoRA linear layers only).

        The routing holds for this model's layers, in the calling thread (context) only: other threads, and other
        models called inside the block, run as they would without it. Calls from several threads at once each get
        their own rows. ``adapter_names`` may be a :class:`RowRouting` kept from an earlier block, by one thread that
        knows no weight changed since (``lorakit serve``'s scheduler between commands): its layers skip their checks.

        Raises:
            ConfigError: not in eval mode, names that are not a list of strings, a length other than ``batch``.
            AdapterNotFoundError: a name this model does not hold (which one, and the names it does).
            MergeError: an adapter is merged into the base weights.
            The model is left unchanged by any of them.
        """
        if self.training:
            raise ConfigError("adapter_names (a batch that mixes adapters) runs in eval mode; call model.eval() first")
        kept = adapter_names if isinstance(adapter_names, RowRouting) else None
        names = kept.names if kept else adapter_names
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"adapter_names must be a list of adapter names, one per row; got {names!r}")
        names = list(names)
        if batch is not None and len(names) != batch:
            raise ConfigError(f"adapter_names has {len(names)} entries but the batch has {batch} rows: one per row")
        for name in dict.fromkeys(names):
            if name != BASE_ROW and name not in self.peft_config:
                raise AdapterNotFoundError(
                    f"adapter_names holds {name!r}, which this model does not have; it holds "
                    f"{sorted(self.peft_config)} (and {BASE_ROW!r} for the base model)"
                    + suggest(name, self.peft_config)
                )
        wrappers = self._adapter_layer_list()
        copies = [n for w in wrappers if isinstance(w, ModulesToSaveWrapper) for n in w.adapter_names()]
        if set(copies) & set(names):
            raise ConfigError(
                "adapter_names mixes adapters that train whole modules (modules_to_save); a batch can mix adapters "
                "whose changes are all low-rank. Run these rows in separate batches with set_adapter"
            )
        layers = [w for w in wrappers if isinstance(w, (self.layer_type, WeightLayer))]  # token rows route too
        merged = sorted({a for layer in layers for a in layer.merged_adapters})
        if merged:
            raise MergeError(f"adapters {merged} are merged into the base weights; unmerge them before mixing adapters")
        with routed(layers, kept or RowRouting(names, per_token)):
            yield

    def _refuse_merged(self) -> None:
        merged = sorted({a for _, layer in self.merging_layers() for a in layer.merged_adapters})
        if merged:
            raise MergeError(
                f"adapters {merged} are merged into the base weights; call unmerge_adapter() before disabling them"
            )

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block.

        Raises:
            MergeError: an adapter is merged into the weights, so the base model cannot be recovered by
                switching layers off; call ``unmerge_adapter()`` first.
        """
        self._refuse_merged()
        layers = [layer for _, layer in self.adapter_layers()]
        previous = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, before in zip(layers, previous):
                layer.disable_adapters = before

    # -- merging --------------------------------------------------------------------------------------

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights. See :meth:`LoraLayer.merge`.

        With ``safe_merge`` it is all or nothing: every layer's merged weight is computed in the weight's own
        dtype (W + ΔW, or DoRA's rescaled rows) and checked for NaN/Inf before any layer is written, one layer at
        a time (no second copy of the model is kept); then each is computed again and written.

        Raises:
            MergeError: ``safe_merge`` found NaN/Inf (the layer and adapter are named), or a base layer is
                quantized (found before anything is written); the model is unchanged.
        """
        names = self._merge_names(adapter_names, safe_merge)
        layers = [layer for _, layer in self.merging_layers()]
        for layer in layers:  # a quantized base is refused before any layer is written, safe_merge or not
            layer.refuse_quantized_merge(names)
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)

    def _merge_names(
        self,
        adapter_names: list[str] | None,
        safe_merge: bool,
        dequantize: bool = False,
        dequantize_dtype: torch.dtype | None = None,
    ) -> list[str]:
        """The adapters to merge, checked to exist and, with ``safe_merge``, to merge into every layer without
        NaN/Inf (computed in each weight's own dtype, or as ``dequantize`` would make it; nothing is written)."""
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_adapter(name)
        if safe_merge:
            for module_name, layer in self.merging_layers():
                try:
                    layer.check_merge(names, dequantize=dequantize, dtype=dequantize_dtype)
                except MergeError as error:
                    raise MergeError(f"{module_name}: {error}") from None
        return names

    def unmerge(self) -> None:
        for _, layer in self.merging_layers():
            layer.unmerge()

    def unload(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize_dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Take every lorakit module out of the model (merging first if asked) and return the bare model.

        A ``modules_to_save`` wrapper gives back the active adapter's trained copy when merging, the original
        module otherwise. Merging returns a full-precision model: every quantized (bitsandbytes 4/8-bit) layer
        becomes a plain ``nn.Linear`` in ``dequantize_dtype`` (default: its compute dtype), adapted ones with
        ΔW added; nothing is requantized.
        """
        self._structure_changed()
        if merge:
            # refuse before dequantizing anything; with safe_merge every merged weight is checked here
            names = self._merge_names(adapter_names, safe_merge, dequantize=True, dequantize_dtype=dequantize_dtype)
            for _, layer in self.merging_layers():
                layer.dequantize(dequantize_dtype)
            for _, layer in self.merging_layers():
                layer.merge(names, safe_merge=safe_merge)
        else:
            self.unmerge()
        for name, layer in reversed(list(self.adapter_layers())):  # innermost first: nested layers keep their names
            if isinstance(layer, ModulesToSaveWrapper) and merge:
                replacement = layer.active_module()
            else:
                replacement = layer.original()
            parent, child = _parent(self.model, name)
            setattr(parent, child, replacement)
        if merge:  # a full-precision model: the quantized layers without an adapter are dequantized too
            for name, module in list(self.model.named_modules()):
                kind = kind_for(module)
                if kind is not None and kind.quantized:
                    parent, child = _parent(self.model, name)
                    setattr(parent, child, kind.dequantize(module, dequantize_dtype))
            forget_quantization(self.model)
        return self.model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
