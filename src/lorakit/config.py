"""What every method's configuration shares: :class:`PeftConfig`, the method registry, :class:`TaskType`.

A method (LoRA, AdaLoRA, ...) lives in its own package under :mod:`lorakit.tuners` and registers itself here
with :func:`register_method`: its config class (a :class:`PeftConfig` subclass naming its ``PEFT_TYPE``) and
its tuner (the module that injects it into a model). This module never imports a method; a file's
``peft_type`` is looked up in the registry (:meth:`PeftConfig.from_dict`), and so is the tuner a
:class:`~lorakit.PeftModel` builds (:func:`method_for`).

Field names, defaults and the JSON layout of ``adapter_config.json`` follow Hugging Face PEFT, so a config
written by either library loads in the other. Validation happens in ``__post_init__``: a bad value raises
:class:`~lorakit.errors.ConfigError` naming the field, the value and what is accepted; every field is checked
for its JSON type (a boolean is ``true``/``false``, never the string ``"false"``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

from lorakit.errors import AdapterFileError, ConfigError, suggest

CONFIG_NAME = "adapter_config.json"


class PeftType(str, enum.Enum):
    """The adapter method; those without a registered method are recognised so errors can be precise."""

    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    # lorakit's own: PEFT has no bottleneck adapters (Houlsby/Pfeiffer; the adapters library's BnConfig), so no
    # PEFT file carries this value and PEFT cannot load such an adapter.
    BOTTLENECK = "BOTTLENECK"


class TaskType(str, enum.Enum):
    """What the wrapped model is for; picks the :class:`~lorakit.PeftModel` subclass and default heads."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Heads that a task adds to ``modules_to_save`` (newly initialised, so they must train and be saved).
TASK_HEADS: dict[TaskType, list[str]] = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}


@dataclass
class PeftConfig:
    """The fields every method's config has (PEFT's ``PeftConfig``), and reading and writing the JSON file.

    A subclass describes one method: it sets ``PEFT_TYPE``, adds its fields, checks them in
    ``__post_init__`` (after calling this one) and registers itself with :func:`register_method`.
    """

    task_type: TaskType | str | None = None
    """What the model is for (see :class:`TaskType`); picks the task wrapper and default trainable heads."""
    inference_mode: bool = False
    """True when the adapter is loaded for inference only: its weights are frozen."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; filled in when the adapter is created if left None."""
    revision: str | None = None
    """Hub revision of the base model, for the record."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter, e.g. a new classifier head."""
    peft_type: PeftType | str | None = None
    """The method; always the class's ``PEFT_TYPE``."""

    #: The ``peft_type`` this class describes, and the method's name in messages (set by each method).
    PEFT_TYPE: ClassVar[PeftType | None] = None
    NAME: ClassVar[str] = ""
    #: Fields PEFT writes that this method does not implement, with the value that means "feature off": a file
    #: holding that value loads; any other is refused, since ignoring it would give another model.
    INERT_FIELDS: ClassVar[dict[str, Any]] = {}
    #: Fields PEFT writes that change nothing lorakit computes: any value loads.
    INFORMATIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("peft_version", "auto_mapping")

    def __post_init__(self) -> None:
        if self.PEFT_TYPE is None:
            raise ConfigError(
                "PeftConfig is the base of every method's config; build a method's config such as LoraConfig "
                f"(registered: {', '.join(sorted(c.__name__ for c, _ in _METHODS.values()))})"
            )
        self.peft_type = enum_value(self.peft_type or self.PEFT_TYPE, PeftType, "peft_type")
        if self.peft_type != self.PEFT_TYPE:
            raise ConfigError(
                f"{type(self).__name__} got peft_type={self.peft_type.value!r}; it only describes "
                f"{self.PEFT_TYPE.value!r}"
            )
        self.task_type = enum_value(self.task_type, TaskType, "task_type")
        check_bool("inference_mode", self.inference_mode)
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; accepted: a string or null")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ConfigError(
                    f"modules_to_save={self.modules_to_save!r} is invalid; accepted: a list of module names such as "
                    "['classifier'], or null"
                )
            self.modules_to_save = list(self.modules_to_save)

    # -- what the generic level asks a method's config ---------------------------------------------------

    @property
    def is_prompt_learning(self) -> bool:
        """Whether the method adds virtual tokens instead of changing weights (PEFT attribute, read by tools)."""
        return False

    def for_loading(self) -> PeftConfig:
        """The config to inject with when a saved adapter is loaded (its weights then replace the init's)."""
        return self

    def check_file(self, state: dict[str, Any]) -> None:
        """Refuse a config that contradicts the tensors of its own weights file, before anything is built.

        Raises:
            ShapeMismatchError: naming the first contradiction.
        """

    #: How the method's per-module tensors begin in its file (``<module>.<FILE_PREFIX>...``, e.g. ``lora_``);
    #: ``lorakit inspect`` groups a file's tensors by module with it. Empty: the method has no per-module tensors.
    FILE_PREFIX: ClassVar[str] = ""

    def summary(self) -> str:
        """One line for ``lorakit inspect``: the method and the settings that size it (e.g. ``r=8``)."""
        return self.NAME or str(getattr(self.peft_type, "value", self.peft_type))

    def rank_of(self, tensor: str, shape: list[int]) -> int | None:
        """The rank a file tensor shows (``tensor``: its name after the module's, e.g. ``lora_A``), or None
        when the method has no rank."""
        return None

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with PEFT's keys (sets become sorted lists, enums their values).

        Fields a loaded file held that this class has no field for (a newer PEFT's options, PEFT's switched-off
        features) come back as they were read (:attr:`extra_fields`), so a load → save round trip loses nothing.
        """
        out: dict[str, Any] = dict(self.extra_fields)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    @property
    def extra_fields(self) -> dict[str, Any]:
        """The file's keys this class has no field for, kept to be written back (empty for a config built in code)."""
        return self.__dict__.get("_extra_fields", {})

    def to_json(self) -> str:
        """The JSON text PEFT writes: two-space indent, sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build the config of the file's method from a dict such as a parsed ``adapter_config.json``.

        ``PeftConfig.from_dict`` builds whatever method the file names; a method's own class (``LoraConfig``)
        accepts its method and those derived from it, and reads a dict without ``peft_type`` as its own.

        Raises:
            ConfigError: an unknown or unregistered ``peft_type``, another method than the class reads, a PEFT
                feature lorakit does not implement switched on, or an invalid field value.
        """
        data = dict(data)
        if "peft_type" not in data and cls.PEFT_TYPE is None:
            hint = ""
            if isinstance(data.get("config"), dict) and "model_class" in data:  # AdapterHub's adapter_config.json
                hint = (
                    "; it looks like a folder saved by the adapters library (AdapterHub): load it with "
                    "lorakit.load_adapters_library(model, folder)"
                )
            raise ConfigError(f"this adapter config has no peft_type; lorakit cannot tell which method it is{hint}")
        peft_type = enum_value(data.get("peft_type", cls.PEFT_TYPE), PeftType, "peft_type")
        if peft_type not in _METHODS:
            supported = ", ".join(repr(t.value) for t in _METHODS)
            raise ConfigError(f"peft_type={peft_type.value!r} is not supported by lorakit; supported: {supported}")
        target = _METHODS[peft_type].config
        if not issubclass(target, cls):  # AdaLoraConfig.from_dict on a plain LoRA file, for instance
            raise ConfigError(f"this adapter is {peft_type.value!r}; {cls.__name__} reads {cls.PEFT_TYPE.value!r}")
        known = {f.name for f in dataclasses.fields(target)}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
                continue
            if key == "peft_version":  # who wrote the file; lorakit does not claim it when it writes one
                continue
            if key in target.INERT_FIELDS:
                off = target.INERT_FIELDS[key]
                if value != off and value not in (None, {}):
                    raise ConfigError(
                        f"this adapter uses {key}={value!r}, a PEFT feature lorakit does not implement; "
                        f"lorakit loads adapters with {key}={off!r}"
                    )
            elif key not in target.INFORMATIONAL_FIELDS:
                warnings.warn(
                    f"adapter config field {key!r} is unknown to lorakit: it changes nothing lorakit computes and is "
                    "written back unchanged when the adapter is saved",
                    stacklevel=2,
                )
            extra[key] = value
        config = target(**target.fields_from_file(kwargs))
        if extra:
            config.__dict__["_extra_fields"] = extra
        return config

    @classmethod
    def fields_from_file(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments for a file's known fields (a method maps PEFT-only values here)."""
        return kwargs

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` atomically (see :mod:`lorakit.persistence`)."""
        from lorakit.io import atomic_write_bytes

        try:
            os.makedirs(save_directory, exist_ok=True)
            atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), self.to_json().encode())
        except OSError as exc:
            if isinstance(exc, AdapterFileError):
                raise
            raise AdapterFileError(f"cannot write {CONFIG_NAME} into {os.fspath(save_directory)!r}: {exc}") from exc

    @classmethod
    def from_pretrained(
        cls: type[C], pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> C:
        """Read ``adapter_config.json`` from a folder (or the file itself) or a hub repo.

        Args:
            pretrained_model_name_or_path: a local folder or file, or a hub repo id (PEFT's name).
            subfolder: the folder inside it holding the file.
            kwargs: the hub options ``revision``, ``token``, ``cache_dir``, ``local_files_only`` (passed to
                ``huggingface_hub`` for a repo id, ignored for a local folder, as in PEFT: so ``revision=`` names
                the adapter's revision, not the config field; set that on the returned config), and fields of
                the file's config class, which override the file's values. Any other name is refused.

        Raises:
            AdapterFileError: the file is missing (locally or on the hub) or is not valid JSON.
            ConfigError: an unknown keyword argument; see also :meth:`from_dict`.
        """
        from lorakit.io import HUB_OPTIONS, hub_options, resolve_adapter_file

        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in HUB_OPTIONS}
        hub = hub_options(kwargs, f"{cls.__name__}.from_pretrained")
        file = resolve_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, hub=hub)
        data = read_json(file)
        kind = data.get("peft_type") or cls.PEFT_TYPE
        method = _METHODS.get(kind) if overrides and isinstance(kind, str) else None
        if method is not None:  # (else from_dict names what is wrong with the file)
            fields = {f.name for f in dataclasses.fields(method.config)}
            unknown = [k for k in overrides if k not in fields]
            if unknown:
                raise ConfigError(
                    f"{cls.__name__}.from_pretrained got {', '.join(repr(k) for k in unknown)}, neither a hub option "
                    f"(revision, token, cache_dir, local_files_only) nor a field of this adapter's config"
                    f"{suggest(unknown[0], fields)}"
                )
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of a config file, as a dict (PEFT's method, which returns the dict too: build a config
        with :meth:`from_dict`). A ``runtime_config`` key is dropped with a warning, as PEFT does.

        Raises:
            AdapterFileError: the file is missing or is not a JSON object.
        """
        data = read_json(path_json_file)
        if "runtime_config" in data:
            warnings.warn("ignoring the config file's runtime_config: it holds a run's settings", stacklevel=2)
            del data["runtime_config"]
        return data


C = TypeVar("C", bound=PeftConfig)


# -- the method registry ---------------------------------------------------------------------------------


class Method(NamedTuple):
    """One registered method: its config class and its tuner (the ``nn.Module`` that injects it)."""

    config: type[PeftConfig]
    tuner: type


_METHODS: dict[PeftType, Method] = {}


def register_method(config: type[PeftConfig], tuner: type) -> None:
    """Make a method known: files naming ``config.PEFT_TYPE`` build ``config``, and models with such a config
    are adapted by ``tuner``. Called once by each method's package (:mod:`lorakit.tuners`).

    Raises:
        ConfigError: another method already registered that ``peft_type``.
    """
    known = _METHODS.get(config.PEFT_TYPE)
    if known is not None and known != (config, tuner):
        raise ConfigError(f"peft_type {config.PEFT_TYPE.value!r} is registered already, by {known.config.__name__}")
    _METHODS[config.PEFT_TYPE] = Method(config, tuner)


def method_for(config: PeftConfig) -> Method:
    """The registered method of ``config``.

    Raises:
        ConfigError: ``config`` is not a lorakit method's config.
    """
    method = _METHODS.get(getattr(config, "peft_type", None)) if isinstance(config, PeftConfig) else None
    if method is None or not isinstance(config, method.config):
        names = ", ".join(sorted(f"lorakit.{m.config.__name__}" for m in _METHODS.values()))
        raise ConfigError(f"peft_config is a {type(config).__name__}; lorakit accepts one of its configs: {names}")
    return method


# -- reading files ---------------------------------------------------------------------------------------


def read_json(file: str | os.PathLike) -> dict[str, Any]:
    """Parse a JSON object from ``file``; raises :class:`AdapterFileError` naming the file when it is not."""
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"cannot read adapter config {os.fspath(file)!r}: {exc}") from exc
    except RecursionError:
        raise AdapterFileError(f"adapter config {os.fspath(file)!r} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"adapter config {os.fspath(file)!r} holds {type(data).__name__}, not a JSON object")
    return data


# -- field checks shared by the methods' configs ---------------------------------------------------------


def enum_value(value: Any, enum_cls: type[enum.Enum], field_name: str) -> Any:
    """``value`` as a member of ``enum_cls`` (None stays None).

    Raises:
        ConfigError: not a member's value; lists the accepted ones.
    """
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except (ValueError, TypeError):
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{field_name}={value!r} is not known; accepted: {accepted}") from None


def is_int(value: Any) -> bool:
    """An integer, and not a boolean (``True`` is an ``int`` in Python, never a rank in a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is invalid; accepted: true or false (a boolean)")


def check_positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive integer such as 8 or 16")


def check_positive_number(name: str, value: Any) -> None:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive finite number such as 16")


def check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def check_pattern_dict(name: str, value: Any, example: str, regex: bool = True) -> None:
    """A ``{module name or regex: value}`` dict with string keys (each a valid regex when ``regex``)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a dict of module names (or regexes), e.g. {example}")
    if regex:
        for key in value:
            check_regex(f"{name} key", key)


def name_selector(name: str, value: Any) -> list[str] | str | None:
    """A module selector as configs hold it: a list of names, one regex (checked), ``"all-linear"`` or None.

    Raises:
        ConfigError: anything else, or a regex that does not compile.
    """
    if value is None:
        return value
    if isinstance(value, str):
        if value != "all-linear":
            check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(f"{name}={value!r} is invalid; accepted: a list of module names, a regex string, or None")


T = TypeVar("T")


def pattern_value(patterns: dict[str, T], name: str, default: T) -> T:
    """The value of the first key of ``patterns`` that matches the end of module ``name`` as a regex, else default.

    The rule of ``rank_pattern`` and ``alpha_pattern`` (PEFT's): ``{"q_proj": 16}`` or ``{"layers\\.0\\..*": 4}``.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
