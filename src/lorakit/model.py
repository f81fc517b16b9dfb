"""The user-facing model: :class:`PeftModel`, its task subclasses and :func:`get_peft_model`.

Names, arguments and behaviour follow Hugging Face PEFT, so code written for PEFT runs after replacing the
import. Module layout is PEFT's too (``peft_model.base_model.model`` is the original model), so state-dict
keys, Trainer checkpoints and adapter files line up.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

import lorakit.persistence as persistence
from lorakit.config import TASK_HEADS, PeftConfig, PeftType, method_for
from lorakit.errors import AdapterExistsError, AdapterFileError, ConfigError
from lorakit.forward_signature import reports_base_signature
from lorakit.functional import check_load_options, default_key_mapping, remap_keys
from lorakit.io import hub_options
from lorakit.layers.base import check_adapter_name as _check_adapter_name
from lorakit.model_card import CARD_NAME, adapter_card, write_card
from lorakit.persistence import load_adapter_state, module_key, read_adapter, save_adapter, write_adapter
from lorakit.push import push_adapters, push_options
from lorakit.sharding import is_sharded
from lorakit.status import count_parameters, get_layer_status, get_model_status
from lorakit.undo import keep_undos, run_undos


class PeftModel(nn.Module):
    """A base model with adapters of one method (whichever its config's ``peft_type`` registered).

    Args:
        model: the base model; it is modified in place (adapter layers are inserted into it).
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name.
        autocast_adapter_dtype: keep adapters in fp32 when the base is fp16/bf16 (as PEFT does).

    Attributes:
        base_model: the method's tuner (for LoRA :class:`~lorakit.tuners.lora.model.LoraModel`);
            ``base_model.model`` is the original model.
        peft_config: adapter name -> config.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        tuner = method_for(peft_config).tuner
        _check_adapter_name(adapter_name)
        peft_config = _with_task_defaults(model, peft_config)
        self.peft_config: dict[str, PeftConfig] = {adapter_name: peft_config}
        self.base_model = tuner(model, self.peft_config, adapter_name, autocast_adapter_dtype)
        if _is_checkpointing(model):
            self._enable_input_grads()

    # -- forwarding to the base model -----------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # PEFT users read the base model's attributes through the wrapper (model.config,
        # model.num_parameters(), model.device, ...), and the HF Trainer does too. One fallback covers them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The original model, with the adapter layers inside it."""
        return self.base_model.model

    @property
    def peft_type(self) -> PeftType:
        return next(iter(self.peft_config.values())).peft_type

    @property
    def active_adapter(self) -> str:
        """The name of the active adapter."""
        active = self.base_model.active_adapters
        return active[0] if active else ""

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    # -- adapters -------------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter (not made active; call :meth:`set_adapter`).

        Args:
            low_cpu_mem_usage: PEFT's, accepted; no effect. autocast_adapter_dtype: fp32 adapters on a 16-bit base.

        Raises:
            AdapterExistsError: the name is taken.
            ConfigError: the config is invalid for this model (the model is left unchanged).
        """
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterExistsError(
                f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first or pick another name"
            )
        method_for(peft_config)  # a lorakit method's config (the tuner refuses a second method)
        peft_config = _with_task_defaults(self.base_model.model, peft_config)
        self.peft_config[adapter_name] = peft_config
        autocast = self.base_model.autocast_adapter_dtype
        self.base_model.autocast_adapter_dtype = autocast_adapter_dtype
        try:
            self.base_model.inject(adapter_name, peft_config)
        except BaseException:
            del self.peft_config[adapter_name]
            raise
        finally:
            self.base_model.autocast_adapter_dtype = autocast

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (the only one applied and trained; an adapter loaded for
        inference stays frozen). ``inference_mode=True`` freezes every adapter, this one too (PEFT's argument)."""
        self._check_adapter(adapter_name)
        self.base_model.set_adapter(adapter_name)
        if inference_mode:
            self.base_model.set_requires_grad(list(self.peft_config), requires_grad=False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was active, the first remaining adapter becomes active."""
        self._check_adapter(adapter_name)
        self.base_model.remove_adapter_layers(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.base_model.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.base_model.set_adapter(remaining)
        else:
            self.base_model.active_adapters = []

    def _check_adapter(self, adapter_name: str) -> None:
        self.base_model._check_adapter(adapter_name)  # the same dict: one message, one place

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's method: :meth:`lorakit.tuners.base.Tuner.set_requires_grad`."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    get_layer_status = get_layer_status  # PEFT's methods: lorakit.status's functions, of this model
    get_model_status = get_model_status

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager in which the model behaves as the base model (adapters bypassed)."""
        with self.base_model.adapters_disabled():
            yield

    # -- merging --------------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the active (or named) adapters' ΔW into the base weights; the layers stay in place."""
        self.base_model.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Subtract every merged ΔW from the base weights again."""
        self.base_model.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize_dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Merge the active (or named) adapters and return the plain base model, with no adapter layers.

        Quantized (bitsandbytes) layers come back as plain ``nn.Linear`` in ``dequantize_dtype`` (default: their
        compute dtype) holding dequantized weight + ΔW: lorakit never requantizes silently.
        """
        return self.base_model.unload(
            merge=True, safe_merge=safe_merge, adapter_names=adapter_names, dequantize_dtype=dequantize_dtype
        )

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the original base model."""
        return self.base_model.unload(merge=False)

    # -- parameters -----------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, counted as PEFT counts them."""
        return count_parameters(self)

    def num_parameters(
        self, only_trainable: bool = False, exclude_embeddings: bool = False, trainable: bool | None = None
    ) -> int:
        """transformers' ``num_parameters`` over the whole adapted model.

        ``trainable=`` is accepted as an alias of ``only_trainable=`` (some PEFT tutorials spell it so).
        """
        if trainable is not None:
            only_trainable = trainable
        return self.get_base_model().num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- gradient checkpointing -----------------------------------------------------------------------

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Enable activation (gradient) checkpointing in the base model; make its input embeddings require grad.

        With the base frozen, re-entrant checkpointing would otherwise see no input that needs a gradient, and
        the adapters inside checkpointed blocks would get none. ``kwargs`` (``every_n_layers``, ``offload``) go
        to transformers.
        """
        model = self.get_base_model()
        if hasattr(model, "disable_input_require_grads"):  # transformers adds its hook again on every enable, and
            model.disable_input_require_grads()  # TRL re-enables around each reference forward: no pile of hooks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        self._enable_input_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def _enable_input_grads(self) -> None:
        model = self.get_base_model()  # one hook: transformers may have added it already
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            return
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``, except that a tensor tied under two keys (``lm_head`` = ``embed_tokens``)
        is returned as a copy under its second key.

        The HF Trainer writes ``model.state_dict()`` straight to safetensors for any model class it does not
        know, and safetensors refuses shared tensors: without this, Trainer checkpoints of tied-embedding models
        (SmolLM2, Qwen2.5, Llama-3.2, Gemma) fail. Loading such a dict back works unchanged.
        """
        state = super().state_dict(*args, **kwargs)
        seen: dict[tuple, str] = {}
        for key, tensor in list(state.items()):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or is_sharded(tensor):
                continue  # a sharded tensor (FSDP2's DTensor) has no storage to compare; its gatherer copies it
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if ident in seen:
                state[key] = tensor.detach().clone()
            else:
                seen[ident] = key
        return state

    # -- files ----------------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save adapters in PEFT's format: ``default`` at the folder root, others in ``<folder>/<name>/``, and the
        model card ``README.md`` at the root (:mod:`lorakit.model_card`; an existing card is updated, its text kept).

        Only adapter weights are written (plus biases and ``modules_to_save`` copies the config asks for).
        Each adapter's files replace the previous ones atomically (the card with the root's adapter).

        Args:
            path_initial_model_for_weight_conversion: the folder of a PiSSA/OLoRA adapter saved right after its
                creation: each adapter is then written as the plain LoRA adapter of rank 2r that gives the trained
                model on the original base (:mod:`lorakit.tuners.lora.start_conversion`; PEFT's argument).
            push_to_hub: then also upload the saved files, and only those, to the hub repo ``repo_id=`` (default:
                the folder's name), with ``token=``, ``private=``, ``commit_message=``, ``commit_description=``,
                ``revision=``, ``create_pr=`` (see :meth:`push_to_hub`). ``repo_id=`` alone only names the repo in
                the card's loading code.

        Raises:
            AdapterNotFoundError: a selected adapter does not exist.
            AdapterFileError: the folder cannot be written, or the push failed.
            ConfigError: a push option without ``push_to_hub=True``.
        """
        if os.path.isfile(save_directory):
            raise AdapterFileError(f"save_directory {os.fspath(save_directory)!r} is a file; give a folder path")
        repo_id = kwargs.pop("repo_id", None)
        push = push_options(kwargs, "save_pretrained", push_to_hub)
        if push_to_hub and repo_id is None:  # transformers' default: the folder's name, in the user's namespace
            repo_id = os.path.basename(os.path.normpath(os.fspath(save_directory)))
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name)
        if not is_main_process:
            return
        configs = {}
        for name in names:
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = base_name_or_path(self.get_base_model())
            config.inference_mode = True
            configs[name] = self.base_model.file_config(name, config)  # what the method writes differently
        converted, initial = {}, path_initial_model_for_weight_conversion
        if initial is not None:  # PiSSA/OLoRA as plain LoRA on the original base (the method converts)
            convert = getattr(type(self.base_model), "convert_for_initial_base", None)
            if convert is None:
                raise ConfigError(f"path_initial_model_for_weight_conversion converts LoRA, not {self.peft_type}")
            start = persistence.read_adapter_weights(initial)
            for name, config in configs.items():
                tensors = persistence.adapter_tensors(self.base_model, name, save_embedding_layers)
                converted[name] = convert(self.base_model, name, config, tensors, start, os.fspath(initial))
        card = adapter_card(self, save_directory, configs, repo_id) if configs else {}
        for name, config in configs.items():
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            extra = card if name == "default" else None  # the card changes with the root's adapter, as one unit
            if name in converted:
                write_adapter(folder, converted[name][1], config, safe_serialization, extra)
            else:
                save_adapter(self.base_model, name, folder, config, safe_serialization, save_embedding_layers, extra)
            self.base_model.after_save(name, config, folder)
        if card and "default" not in configs:
            write_card(save_directory, card)
        if push_to_hub:  # what was just saved, its card included (a second save, into a temporary folder)
            saving = dict(safe_serialization=safe_serialization, save_embedding_layers=save_embedding_layers)
            saving["path_initial_model_for_weight_conversion"] = path_initial_model_for_weight_conversion
            card_file = os.path.join(save_directory, CARD_NAME)
            push_adapters(self, repo_id, names, saving, push, seed_card=card_file if os.path.isfile(card_file) else "")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        **kwargs: Any,
    ) -> Any:
        """Upload the adapters (and their model card) to the hub repo ``repo_id``: never the base model.

        The files are those :meth:`save_pretrained` writes, laid out as PEFT pushes them (``default`` at the repo
        root, other adapters in subfolders), uploaded in one commit; the repo is created if needed. The repo's
        current ``README.md``, if any, is updated rather than replaced.

        Args:
            kwargs: ``token``, ``private`` (used when the repo is created), ``commit_message``,
                ``commit_description``, ``revision`` (the branch), ``create_pr``, as in transformers.

        Returns:
            ``huggingface_hub``'s ``CommitInfo``.

        Raises:
            ConfigError: an unknown keyword argument.
            AdapterFileError: the hub refused or could not be reached (nothing was committed).
        """
        push = push_options(kwargs, "push_to_hub", True, strict=True)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name)
        saving = dict(safe_serialization=safe_serialization, save_embedding_layers=save_embedding_layers)
        return push_adapters(self, repo_id, names, saving, push)

    def export_lora(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> PeftConfig:
        """Write an AdaLoRA adapter as the plain LoRA adapter with the same update (PEFT's LoRA format).

        Each module keeps the rank AdaLoRA left it (``rank_pattern`` where it differs from the most common);
        modules left with no rank are dropped. Loads in lorakit and PEFT on the same base with the same outputs.

        Returns:
            the written LoRA config.

        Raises:
            ConfigError: the model holds no AdaLoRA adapter, or it kept no rank anywhere.
        """
        lora_equivalent = getattr(type(self.base_model), "lora_equivalent", None)
        if lora_equivalent is None:
            raise ConfigError("export_lora converts AdaLoRA adapters; this model's adapters are plain LoRA already")
        config, tensors = self.base_model.lora_equivalent(adapter_name)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base_name_or_path(self.get_base_model())
        config.inference_mode = True
        state = {module_key(name, key): t for name, parts in tensors.items() for key, t in parts.items()}
        write_adapter(save_directory, state, config)
        return config

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter saved by lorakit or PEFT onto ``model``.

        Args:
            model_id: a local folder, or a hub repo id.
            is_trainable: False (the default) loads for inference: adapter weights are frozen.
            ephemeral_gpu_offload, low_cpu_mem_usage, ``torch_device=``: PEFT's, accepted; no effect on the result.
            key_mapping: regexes renaming the file's keys (:func:`lorakit.functional.remap_keys`); default, the
                model's ``_checkpoint_conversion_mapping`` (as PEFT).
            kwargs: the hub options ``revision``, ``token``, ``cache_dir``, ``local_files_only``, passed to
                ``huggingface_hub`` for a repo id (ignored for a local folder, as in PEFT); any other name is refused.

        Raises:
            AdapterFileError, ConfigError, ShapeMismatchError: see :meth:`load_adapter`. On any of them the
                model is left exactly as it was.
        """
        check_load_options(kwargs, "PeftModel.from_pretrained")
        hub = hub_options(kwargs, "PeftModel.from_pretrained")
        config, state = read_adapter(model_id, subfolder=subfolder, config=config, hub=hub)
        state = remap_keys(state, default_key_mapping(model, config, key_mapping))
        config.inference_mode = not is_trainable
        from lorakit.tasks import MODEL_TYPE_TO_PEFT_MODEL  # the task classes build on this module

        model_cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, cls) if cls is PeftModel else cls
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        loading = config.for_loading()
        try:
            with keep_undos() as undos:  # a start that rewrote base weights (PiSSA...) is undone if the load fails
                peft_model = model_cls(model, loading, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        except BaseException:
            _restore_requires_grad(model, requires_grad)
            raise
        if loading is not config:  # the adapter keeps the config it was saved with
            peft_model.peft_config[adapter_name] = _with_task_defaults(model, config)
        try:
            load_adapter_state(peft_model.base_model, adapter_name, state)
        except BaseException:
            peft_model.base_model.unload(merge=False)
            run_undos(undos)
            _restore_requires_grad(model, requires_grad)
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load another saved adapter into this model under ``adapter_name`` (not made active; with
        ``is_trainable=True`` its parameters require grad at once, as PEFT's).

        Args:
            torch_device, ...: PEFT's arguments, as in :meth:`from_pretrained` (``key_mapping`` without default).
            kwargs: the hub options, as in :meth:`from_pretrained`; any other name is refused.

        Returns:
            PEFT's load result (``missing_keys``, ``unexpected_keys``): both empty, a partial file being refused.

        Raises:
            AdapterExistsError: the name is taken.
            AdapterFileError: missing or corrupt files, or tensors that match no module.
            ConfigError: unknown ``peft_type`` or unsupported feature, or an unknown keyword argument.
            ShapeMismatchError: tensors whose shapes do not fit this model.
            On any error the model is left exactly as it was.
        """
        check_load_options(kwargs, "load_adapter")
        hub = hub_options(kwargs, "load_adapter")
        config, state = read_adapter(model_id, subfolder=subfolder, hub=hub)
        state = remap_keys(state, key_mapping)
        config.inference_mode = not is_trainable
        loading = config.for_loading()
        with keep_undos() as undos:
            self.add_adapter(adapter_name, loading, autocast_adapter_dtype=autocast_adapter_dtype)
        if loading is not config:  # the adapter keeps the config it was saved with
            self.peft_config[adapter_name] = _with_task_defaults(self.get_base_model(), config)
        try:
            load_adapter_state(self.base_model, adapter_name, state)
        except BaseException:
            self.delete_adapter(adapter_name)
            run_undos(undos)
            raise
        if is_trainable:
            self.base_model.set_requires_grad(adapter_name)
        return _IncompatibleKeys([], [])

    # -- running --------------------------------------------------------------------------------------

    @reports_base_signature  # inspect.signature(model.forward): the base model's, plus adapter_names
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model with the active adapters; arguments are the base model's.

        Args:
            adapter_names: one adapter name per row of the batch (``"__base__"`` for none), eval mode only:
                every row goes through its own adapter in one pass (:mod:`lorakit.tuners.lora.mixed`).
        """
        with self._rows(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def _run(self, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        kwargs.update({k: v for k, v in named.items() if v is not None})
        adapter_names = kwargs.pop("adapter_names", None)
        with self._rows(adapter_names, (), kwargs):
            return self.base_model(**kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the active adapters applied (or, with ``adapter_names``, one adapter
        per prompt row, as in :meth:`forward`; works with the KV cache, sampling and beam search).

        The tuner runs it: a weight method's tuner answers with the base model's own ``generate`` (its layers hold
        the adapters), a method that adds inputs (a prompt) with one that adds them."""
        with self._rows(adapter_names, args, kwargs):
            return self.base_model.generate(*args, **kwargs)

    def _rows(self, adapter_names: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if adapter_names is None:
            return contextlib.nullcontext()
        first = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        if first is None and args and isinstance(args[0], torch.Tensor):
            first = args[0]
        batch = first.shape[0] if isinstance(first, torch.Tensor) else None
        return self.base_model.rows_routed(adapter_names, batch)


def _with_task_defaults(model: nn.Module, config: PeftConfig) -> PeftConfig:
    heads = TASK_HEADS.get(config.task_type)
    if heads:
        current = list(config.modules_to_save or [])
        config.modules_to_save = current + [h for h in heads if h not in current]
    return config


def base_name_or_path(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    if name is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _restore_requires_grad(model: nn.Module, flags: dict[int, bool]) -> None:
    for param in model.parameters():
        if id(param) in flags:
            param.requires_grad_(flags[id(param)])
