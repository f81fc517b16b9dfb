"""PEFT's ``AutoPeftModel`` classes: an adapter folder (or hub id) in, the base model it names plus the adapter out.

``AutoPeftModelForCausalLM.from_pretrained(path)`` reads the adapter's ``adapter_config.json``, loads the base model
named by its ``base_model_name_or_path`` (at its ``revision``) with the matching transformers Auto class
(``AutoModelForCausalLM``), then :meth:`PeftModel.from_pretrained <lorakit.PeftModel.from_pretrained>` of the task
class. An adapter whose ``task_type`` belongs to another class is refused before anything is loaded.

Differences from PEFT 0.21, on purpose: a task class also loads an adapter without ``task_type`` (with its own Auto
class; PEFT needs the ``auto_mapping`` it writes for those); ``trust_remote_code=True`` is refused (it would run
code from the base model's folder); keyword arguments are routed (PEFT passes all of them to both loads): those of
transformers go to the base model, the adapter's own (``subfolder``, ``key_mapping``, ``autocast_adapter_dtype``...)
to the adapter, and the hub options (``token``, ``cache_dir``, ``local_files_only``) to both.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

import transformers
from torch import nn

from lorakit.config import CONFIG_NAME, PeftConfig, TaskType, read_json
from lorakit.errors import AdapterFileError, ConfigError, ModelNotFoundError
from lorakit.io import HUB_OPTIONS, hub_options, resolve_adapter_file
from lorakit.model import PeftModel
from lorakit.tasks import MODEL_TYPE_TO_PEFT_MODEL

#: Libraries an ``auto_mapping`` (written by PEFT for adapters without ``task_type``) may import a class from.
DEFAULT_IMPORT_ALLOWLIST = ("diffusers", "lerobot", "megatron-core", "transformers")
#: Arguments of the adapter's load only; every other one (except the hub options, given to both) is transformers'.
ADAPTER_ARGS = (
    "subfolder",
    "autocast_adapter_dtype",
    "ephemeral_gpu_offload",
    "key_mapping",
    "torch_device",
    "ignore_mismatched_sizes",
)
TOKENIZER_CONFIG = "tokenizer_config.json"


def get_default_import_allowlist() -> list[str]:
    """PEFT's default: the libraries an ``auto_mapping`` may name."""
    return list(DEFAULT_IMPORT_ALLOWLIST)


class _BaseAutoPeftModel:
    """Loads the adapter's base model with ``_target_class`` (a transformers Auto class), then the adapter."""

    _target_class: ClassVar[Any] = None
    _target_peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        raise ConfigError(f"{name} is not built directly; call {name}.from_pretrained(adapter_path)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named by the adapter's config, with the adapter loaded (PEFT's arguments).

        Args:
            pretrained_model_name_or_path: an adapter folder, or a hub id.
            revision: the adapter's hub revision; the base model is loaded at the revision its config records.
            import_allowlist: libraries an ``auto_mapping`` may import the base model's class from (PEFT's default:
                :data:`DEFAULT_IMPORT_ALLOWLIST`).
            kwargs: transformers' ``from_pretrained`` arguments for the base model (``dtype``, ``device_map``...),
                the adapter's (see :meth:`PeftModel.from_pretrained <lorakit.PeftModel.from_pretrained>`) and the hub
                options; see the module docstring.

        Raises:
            ConfigError: the adapter's ``task_type`` is another class's (both named), no class to load the base
                with, an ``auto_mapping`` outside the allowlist, no ``base_model_name_or_path``, or
                ``trust_remote_code=True``.
            ModelNotFoundError: the base model cannot be loaded.
            AdapterFileError, ShapeMismatchError: as :meth:`PeftModel.from_pretrained`.
        """
        if kwargs.get("trust_remote_code"):
            raise ConfigError(
                "trust_remote_code=True would run code from the base model's folder, which lorakit never does; load "
                "the base model with transformers yourself and call PeftModel.from_pretrained(model, adapter)"
            )
        path = pretrained_model_name_or_path
        hub = {k: kwargs[k] for k in HUB_OPTIONS if kwargs.get(k) is not None and k != "revision"}
        adapter_kwargs = {k: kwargs.pop(k) for k in ADAPTER_ARGS if k in kwargs}
        hub_for_files = hub_options({**hub, "revision": revision}, f"{cls.__name__}.from_pretrained")
        subfolder = adapter_kwargs.get("subfolder")
        data = read_json(resolve_adapter_file(path, CONFIG_NAME, subfolder=subfolder, hub=hub_for_files))
        peft_config = PeftConfig.from_dict(data)
        target = cls._target_class_for(peft_config, data.get("auto_mapping"), import_allowlist)
        if not peft_config.base_model_name_or_path:
            raise ConfigError(
                f"the adapter at {os.fspath(path)!r} does not say which base model it adapts "
                "(base_model_name_or_path is empty); load the base model yourself and call PeftModel.from_pretrained"
            )
        base = _load_base(target, peft_config, kwargs)
        _resize_for_tokenizer(base, path, hub_for_files)
        return cls._target_peft_class.from_pretrained(
            base,
            path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            revision=revision,
            **hub,
            **adapter_kwargs,
        )

    @classmethod
    def _target_class_for(cls, config: PeftConfig, auto_mapping: Any, allowlist: list[str] | None) -> Any:
        """The class the base model is loaded with, checked against the adapter's task type."""
        task = config.task_type
        if task is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL[task]
            if cls._target_class is None or cls._target_peft_class is not expected:
                raise ConfigError(
                    f"this adapter's task_type is {TaskType(task).value!r}, loaded by {AUTO_CLASS[task]} (a "
                    f"{expected.__name__}); {cls.__name__} loads "
                    + (
                        f"{cls._target_peft_class.__name__} adapters"
                        if cls._target_class is not None
                        else "adapters without a task_type"
                    )
                )
            return cls._target_class
        if isinstance(auto_mapping, dict) and auto_mapping.get("base_model_class"):
            return _import_auto_mapping(auto_mapping, allowlist)
        if cls._target_class is not None:
            return cls._target_class
        raise ConfigError(
            "this adapter has no task_type and no auto_mapping, so AutoPeftModel cannot tell which class loads its "
            "base model; use a task class such as AutoPeftModelForCausalLM, or load the base model yourself and call "
            "PeftModel.from_pretrained"
        )


def _import_auto_mapping(auto_mapping: dict[str, Any], allowlist: list[str] | None) -> Any:
    """The class an ``auto_mapping`` names, imported only from an allowed library (as PEFT)."""
    library, name = str(auto_mapping.get("parent_library", "")), str(auto_mapping["base_model_class"])
    allowed = DEFAULT_IMPORT_ALLOWLIST if allowlist is None else tuple(allowlist)
    if not any(library == a or library.startswith(f"{a}.") for a in allowed):
        raise ConfigError(
            f"the adapter's auto_mapping asks to import {name!r} from {library!r}, which is not in the import "
            f"allowlist {list(allowed)}; if that library is safe to import, pass import_allowlist=[{library!r}]"
        )
    try:
        target = getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"the adapter's auto_mapping names {library}.{name}, which cannot be imported: {exc}"
        ) from exc
    if not hasattr(target, "from_pretrained"):
        raise ConfigError(f"the adapter's auto_mapping names {library}.{name}, which has no from_pretrained")
    return target


def _load_base(target: Any, config: PeftConfig, kwargs: dict[str, Any]) -> nn.Module:
    name = config.base_model_name_or_path
    try:
        return target.from_pretrained(name, revision=config.revision, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot load the base model {name!r} (the adapter's base_model_name_or_path) with "
            f"{getattr(target, '__name__', target)}: {exc}"
        ) from exc


def _resize_for_tokenizer(base: nn.Module, path: str | os.PathLike, hub: dict[str, Any]) -> None:
    """PEFT's rule: a tokenizer saved with the adapter that has more tokens than the base model's input embeddings
    (tokens added while training) grows the embeddings to its size before the adapter is loaded."""
    if not hasattr(base, "get_input_embeddings"):
        return
    try:
        file = resolve_adapter_file(path, TOKENIZER_CONFIG, hub=hub)
    except AdapterFileError:
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(file), trust_remote_code=False)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Adapters without a ``task_type``: the base model's class comes from the config's ``auto_mapping``."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = transformers.AutoModelForCausalLM
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.CAUSAL_LM]


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = transformers.AutoModelForSeq2SeqLM
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.SEQ_2_SEQ_LM]


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = transformers.AutoModelForSequenceClassification
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.SEQ_CLS]


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = transformers.AutoModelForTokenClassification
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.TOKEN_CLS]


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = transformers.AutoModelForQuestionAnswering
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.QUESTION_ANS]


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = transformers.AutoModel
    _target_peft_class = MODEL_TYPE_TO_PEFT_MODEL[TaskType.FEATURE_EXTRACTION]


#: The Auto class that loads each task type's adapters (named in errors).
AUTO_CLASS: dict[TaskType, str] = {
    TaskType.CAUSAL_LM: "AutoPeftModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoPeftModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoPeftModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoPeftModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoPeftModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoPeftModelForFeatureExtraction",
}
