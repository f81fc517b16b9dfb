"""The engine the prompt-learning methods share: :class:`PromptLearningModel`.

It is not a :class:`~lorakit.tuners.base.BaseTuner`: nothing is injected into the model's layers. It holds the
model (``self.model``, unchanged but frozen) and one prompt encoder per adapter (``self.prompt_encoder[name]``),
and runs the model with the active adapter's prompt: prepended to the input embeddings (prompt tuning,
P-tuning) or given as past key/values (prefix tuning) — :mod:`.tasks` does it per task type as PEFT's task
classes do, :mod:`.generation` for ``generate``. Towards :class:`~lorakit.PeftModel` and
:mod:`lorakit.persistence` it speaks the same protocol as ``BaseTuner`` (``inject``, ``set_adapter``,
``adapters_disabled``, ``unload``, ``file_config``...), plus ``own_file_tensors``: the prompt, which lives
outside the model's modules, is the file's ``prompt_embeddings``.

A method subclasses it with its config class, its encoder (:meth:`_build_encoder`) and, for prefix tuning,
``prompt_in_cache = True``.

Adapter files are PEFT's; the in-memory layout is lorakit's (``peft_model.base_model.model`` is the model and
``peft_model.base_model.prompt_encoder`` the encoders, where PEFT puts the model at ``peft_model.base_model`` and
the encoders at ``peft_model.prompt_encoder``), so ``state_dict()`` keys differ from PEFT's for these methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.config import PeftConfig
from lorakit.errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, ConfigError, MergeError, suggest
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper
from lorakit.layers.base import check_adapter_name
from lorakit.layers.routing import BASE_ROW, ROUTES, RowRouting, routed
from lorakit.tuners.base import Tuner
from lorakit.tuners.prompt_learning import generation, tasks
from lorakit.tuners.prompt_learning.cache import new_cache, prefix_layers
from lorakit.tuners.prompt_learning.config import PROMPT_KEY, PromptLearningConfig
from lorakit.tuners.prompt_learning.encoder import BasePromptEncoder


class PromptLearningModel(Tuner):
    """A model run with learned prompts; ``self.model`` is the original model object, frozen.

    Args:
        model: a transformers model (its config gives the prompt's sizes; its input embeddings embed the input).
        peft_config: adapter name -> config, shared with the owning :class:`~lorakit.PeftModel`.
        adapter_name: the first adapter, added now and made active.
        autocast_adapter_dtype: accepted for the common signature; prompt encoders are always in torch's default
            dtype (fp32), as in PEFT, and the prompt is cast to the model's dtype when it is used.
    """

    #: The method's config class (an adapter of another method cannot join this model).
    config_class: ClassVar[type[PromptLearningConfig]]
    #: How the prompt enters the model: False, as embeddings before the input's; True, as past key/values.
    prompt_in_cache: ClassVar[bool] = False
    #: PEFT keeps the model itself as ``PeftModel.base_model`` for these methods, so its files name a model
    #: tensor (a ``modules_to_save`` copy) ``base_model.<name>`` (read by :mod:`lorakit.persistence`).
    file_key_prefix: ClassVar[str] = "base_model."

    def _setup(self) -> None:
        self.prompt_encoder = nn.ModuleDict()
        self._disabled = False

    # -- what a method says ---------------------------------------------------------------------------

    def _build_encoder(self, config: PromptLearningConfig) -> BasePromptEncoder:
        """The new adapter's encoder (sizes in ``config`` are filled in)."""
        raise NotImplementedError

    def _check_model(self, config: PromptLearningConfig) -> None:
        """Refuse, before anything changes, a model this method cannot run with a prompt.

        Raises:
            ConfigError: for virtual tokens, a model without input embeddings.
        """
        if not self.prompt_in_cache:
            self.word_embeddings  # noqa: B018 -- raises for a model without input embeddings

    # -- adding and removing adapters -----------------------------------------------------------------

    def inject(self, adapter_name: str, config: PeftConfig) -> None:
        """Give the model a new adapter: its encoder, and its copies of ``modules_to_save``. Freezes the model.

        The config's size fields left None are filled from the model's config (PEFT does the same to the
        object it is given). On any error the model is left as it was.

        Raises:
            ConfigError: an invalid adapter name, a config of another method, no ``task_type`` or another than the
                other adapters', a model the method cannot adapt, or bad ``modules_to_save``.
            AdapterExistsError: the name is taken.
        """
        check_adapter_name(adapter_name)
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"this model holds {self.config_class.NAME} adapters; a {config.peft_type.value} adapter cannot join "
                "them (PEFT keeps one method per model as well): load it onto a separate model"
            )
        if adapter_name in self.prompt_encoder:
            raise AdapterExistsError(f"adapter {adapter_name!r} already exists")
        tasks.check_task(config, [c.task_type for n, c in self.peft_config.items() if n in self.prompt_encoder])
        config.fill_from_model(getattr(self.model, "config", None))
        self._check_model(config)
        encoder = self._build_encoder(config).to(self._device())
        self.prompt_encoder[adapter_name] = encoder
        try:
            self._add_modules_to_save(adapter_name, config)
        except BaseException:
            self.remove_adapter_layers(adapter_name)
            raise
        for param in self.model.parameters():  # the base model never trains (PEFT freezes it too)
            param.requires_grad_(False)
        if config.inference_mode:
            encoder.requires_grad_(False)
        self.set_adapter([a for a in self.active_adapters if a in self.prompt_encoder])

    def remove_adapter_layers(self, adapter_name: str) -> None:
        """Delete ``adapter_name``'s encoder and module copies; a wrapper left with no copy gives back its module."""
        for name, layer in list(self.adapter_layers()):
            if adapter_name in layer.adapter_names():
                layer.delete(adapter_name)
            if not layer.adapter_names():
                self._put_back(name, layer.original())
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]

    def _put_back(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)

    def _device(self) -> torch.device:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None:
            return embeddings.weight.device
        return next(self.model.parameters()).device

    # -- switching ------------------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active.names)

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active.set(names)

    @property
    def active_adapter(self) -> str | list[str]:
        names = self.active_adapters
        return names[0] if len(names) == 1 else names

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterNotFoundError(
                f"unknown adapter {adapter_name!r}; this model holds {sorted(self.peft_config)}"
                + suggest(adapter_name, self.peft_config)
            )

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make one adapter the active one; only its parameters require grad (unless it is in inference mode).

        Raises:
            AdapterNotFoundError: a name this model does not hold.
            ConfigError: more than one name: the prompt is the model's input, so one adapter runs at a time (a
                batch whose rows use different adapters takes ``adapter_names=``).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_adapter(name)
        if len(set(names)) > 1:
            raise ConfigError(
                f"{self.config_class.NAME} runs one adapter at a time (its prompt is the model's input), not "
                f"{names}; to give each row of a batch its own adapter, pass adapter_names=[...] to forward/generate"
            )
        names = names[:1]
        for module_name, layer in self.adapter_layers():
            if isinstance(layer, ModulesToSaveWrapper):
                layer.check_active(names, module_name)
                layer.follow(self._active)
        for adapter, config in self.peft_config.items():
            if adapter in self.prompt_encoder and not config.inference_mode:
                for param in self.adapter_parameters(adapter):
                    param.requires_grad_(adapter in names)
        self._active.set(names)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Freeze adapters (``requires_grad=False``, e.g. ``set_adapter(name, inference_mode=True)``).

        Raises:
            ConfigError: ``requires_grad=True``: whether a prompt can train is decided when it is loaded (a P-tuning
                file holds the encoder's output only), so it is refused here, as PEFT refuses it for prompt learning.
        """
        if requires_grad:
            raise ConfigError(
                f"set_requires_grad(..., requires_grad=True) is not available for {self.config_class.NAME} adapters "
                "(PEFT refuses it too): load the adapter with is_trainable=True, or add a new one to train"
            )
        super().set_requires_grad(adapter_names, requires_grad)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The parameters adapter ``adapter_name`` trains: its encoder's and its module copies'."""
        params = list(self.prompt_encoder[adapter_name].parameters())
        for _, layer in self.adapter_layers():
            if adapter_name in layer.adapter_names():
                params.extend(layer.adapter_parameters(adapter_name))
        return params

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block: no prompt, the original modules instead of their copies."""
        layers = [layer for _, layer in self.adapter_layers()]
        before = (self._disabled, [layer.disable_adapters for layer in layers])
        self._disabled = True
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            self._disabled = before[0]
            for layer, flag in zip(layers, before[1]):
                layer.disable_adapters = flag

    # -- merging: there is nothing to merge ---------------------------------------------------------------

    def _no_merge(self) -> MergeError:
        return MergeError(
            f"{self.config_class.NAME} adapters cannot be merged: their virtual tokens are extra inputs to the model, "
            "not an update of its weights, so no merged model computes the same outputs. Keep the PeftModel for "
            "inference, or unload() to get the base model back"
        )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Raises :class:`~lorakit.errors.MergeError`: a prompt is not a weight update."""
        raise self._no_merge()

    def unmerge(self) -> None:
        """Nothing is ever merged, so nothing to do."""

    def unload(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None, **_: Any
    ) -> nn.Module:
        """Remove every adapter (prompts and module copies) and return the original model.

        Raises:
            MergeError: ``merge=True`` (``merge_and_unload``); the model is unchanged.
        """
        if merge:
            raise self._no_merge()
        for name, layer in list(self.adapter_layers()):
            self._put_back(name, layer.original())
        for adapter in list(self.prompt_encoder):
            del self.prompt_encoder[adapter]
        return self.model

    # -- what persistence asks ----------------------------------------------------------------------------

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(name, wrapper)`` for every ``modules_to_save`` wrapper in the model."""
        for name, module in self.model.named_modules():
            if isinstance(module, AdapterLayer):
                yield name, module

    def weight_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """None: prompt learning changes no layer."""
        return iter(())

    def layer_file_state(self, name: str, layer: AdapterLayer, adapter: str) -> dict[str, torch.Tensor]:
        return layer.adapter_state(adapter)

    def own_file_tensors(self, adapter_name: str, loading: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors that live outside the model: ``{"prompt_embeddings": ...}``.

        Saving: the prompt (the encoder's output; PEFT's ``get_prompt_embedding_to_save``). Loading: the tensor the
        file's prompt is copied into, ``embedding.weight``.

        Raises:
            AdapterFileError: loading into an adapter whose prompt is computed by trainable layers (a trainable
                P-tuning or projected-prefix adapter): the file holds their output, not them.
        """
        encoder = self.prompt_encoder[adapter_name]
        if not loading:
            return {PROMPT_KEY: encoder.file_tensor()}
        if encoder.reparameterized:
            raise AdapterFileError(
                f"adapter {adapter_name!r} computes its prompt with trainable layers ({self.config_class.NAME} "
                f"encoder), but a file holds only their output ({PROMPT_KEY!r}); load it for inference "
                "(is_trainable=False), where the prompt is used as it is"
            )
        return {PROMPT_KEY: encoder.embedding.weight}

    def file_config(self, adapter_name: str, config: PeftConfig) -> PeftConfig:
        """The config as the file holds it: as in memory (the sizes were filled in when the adapter was added)."""
        return config

    def after_save(self, adapter_name: str, config: PeftConfig, folder: str) -> None:
        """Nothing to add after a save."""

    # -- the prompt -----------------------------------------------------------------------------------

    @property
    def word_embeddings(self) -> nn.Module:
        """The model's input embeddings (PEFT's attribute), which embed the input ids.

        Raises:
            ConfigError: the model has no ``get_input_embeddings``.
        """
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is None:
            raise ConfigError(
                f"{type(self.model).__name__} has no input embeddings (get_input_embeddings); "
                f"{self.config_class.NAME} needs them to put its virtual tokens before the input's"
            )
        return embeddings

    @property
    def prompt_tokens(self) -> dict[str, torch.Tensor]:
        """Adapter name -> the indices of its virtual tokens (PEFT's attribute)."""
        return {name: encoder.virtual_tokens().cpu() for name, encoder in self.prompt_encoder.items()}

    def _row_names(self, batch_size: int) -> tuple[str, ...]:
        routing = (ROUTES.get() or {}).get(self)
        if routing is not None:
            return routing.rows(batch_size)
        active = self.active_adapters
        if not active:
            raise ConfigError("no adapter is active; call set_adapter(name)")
        return (active[0],) * batch_size

    def active_config(self) -> PromptLearningConfig:
        """The config the current call runs (with ``adapter_names``, that of the batch's first adapter: the batch's
        adapters share task and sizes)."""
        routing = (ROUTES.get() or {}).get(self)
        name = routing.adapters[0] if routing is not None else self._row_names(1)[0]
        return self.peft_config[name]

    def prompts(self, batch_size: int) -> torch.Tensor:
        """The prompt of each row, ``(batch_size, rows, width)``: the active adapter's, or with ``adapter_names``
        each row's adapter's (each encoder runs once per call)."""
        names = self._row_names(batch_size)
        distinct = dict.fromkeys(names)
        if len(distinct) == 1:
            return self.prompt_encoder[names[0]].prompt().expand(batch_size, -1, -1)
        computed = {name: self.prompt_encoder[name].prompt() for name in distinct}
        return torch.cat([computed[name] for name in names])

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> Any:
        """What the model is given (PEFT's method): the virtual-token embeddings ``(batch, tokens, token_dim)``,
        or for prefix tuning a transformers cache holding every layer's prefix keys and values."""
        if not self.prompt_in_cache:
            return self.prompts(batch_size)
        config = self.active_config()
        return new_cache(self.prefix_layers(batch_size), encoder_decoder=config.num_transformer_submodules == 2)

    def prefix_layers(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's prefix keys and values, ``(batch, heads, tokens, head_dim)``, in the model's dtype."""
        prefix = self.prompts(batch_size)
        dtype = getattr(self.model, "dtype", None)
        return prefix_layers(prefix.to(dtype) if isinstance(dtype, torch.dtype) else prefix, self.active_config())

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The prompt a file stores for ``adapter_name``, on the CPU (PEFT's method)."""
        self._check_adapter(adapter_name)
        return self.prompt_encoder[adapter_name].file_tensor().cpu()

    # -- batches that mix adapters --------------------------------------------------------------------

    @contextlib.contextmanager
    def rows_routed(self, adapter_names: list[str], batch: int | None = None) -> Iterator[None]:
        """Inside the block, row i of every batch gets adapter ``adapter_names[i]``'s prompt (this call only, in
        the calling thread; generation that repeats rows, beams or samples, repeats the names with them).

        Raises:
            ConfigError: not in eval mode, not one name per row, ``"__base__"`` rows (they would need another
                sequence length), adapters of different prompt lengths or tasks, or adapters with module copies.
            AdapterNotFoundError: a name this model does not hold.
        """
        if self.training:
            raise ConfigError("adapter_names (a batch that mixes adapters) runs in eval mode; call model.eval() first")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ConfigError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}")
        names = list(adapter_names)
        if batch is not None and len(names) != batch:
            raise ConfigError(
                f"adapter_names has {len(names)} entries but the batch has {batch} rows; give one per row"
            )
        if BASE_ROW in names:
            raise ConfigError(
                f"adapter_names holds {BASE_ROW!r}: a base-model row has no virtual tokens, so its sequence is shorter "
                f"than the others'; run base-model rows in their own batch (inside disable_adapter())"
            )
        for name in dict.fromkeys(names):
            self._check_adapter(name)
        configs = {n: self.peft_config[n] for n in dict.fromkeys(names)}
        if len({(c.num_virtual_tokens, c.task_type, c.num_transformer_submodules) for c in configs.values()}) > 1:
            lengths = {n: c.num_virtual_tokens for n, c in configs.items()}
            raise ConfigError(
                "adapter_names mixes adapters with different num_virtual_tokens (or task types); every row of a "
                f"batch needs a prompt of the same length: {lengths}"
            )
        copies = {n for _, layer in self.adapter_layers() for n in layer.adapter_names()}
        if copies & set(names):
            raise ConfigError(
                "adapter_names mixes adapters that train whole modules (modules_to_save); run these rows in separate "
                "batches with set_adapter"
            )
        with routed([self], RowRouting(names)):
            yield

    # -- running --------------------------------------------------------------------------------------

    def _runs_prompt(self) -> bool:
        return not self._disabled and bool(self.active_adapters or (ROUTES.get() or {}).get(self))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model with the prompt: ``input_ids``/``inputs_embeds``, masks and labels as the model takes them."""
        if not self._runs_prompt():
            return self.model(*args, **kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise ConfigError("pass the model's inputs by keyword (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        return tasks.run(self, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate`` with the prompt; works with the KV cache, left padding, beams and sampling."""
        if not self._runs_prompt():
            return self.model.generate(*args, **kwargs)
        return generation.generate(self, args, kwargs)
