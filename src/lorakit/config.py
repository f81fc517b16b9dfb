"""Adapter configurations: :class:`LoraConfig`, :class:`TaskType`, :class:`PeftType`.

Field names, defaults and the JSON layout of ``adapter_config.json`` follow Hugging Face PEFT, so a config
written by either library loads in the other. Each field is documented once, here.

Validation happens in ``__post_init__``: a bad value raises :class:`~lorakit.errors.ConfigError` naming the
field, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lorakit.errors import AdapterFileError, ConfigError

CONFIG_NAME = "adapter_config.json"


class PeftType(str, enum.Enum):
    """The adapter method. lorakit implements ``LORA``; the others are recognised so errors can be precise."""

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


SUPPORTED_PEFT_TYPES = (PeftType.LORA, PeftType.ADALORA)


class TaskType(str, enum.Enum):
    """What the wrapped model is for; picks the :class:`~lorakit.PeftModel` subclass and default heads."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Fields PEFT writes that lorakit does not implement, with the value that means "feature off". A config
# holding the off value loads silently; any other value is refused, because ignoring it would give a model
# that differs from the one the adapter was trained on.
_PEFT_INERT_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "peft_version": None,  # informational; any value is fine
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
_ANY_VALUE_FIELDS = {"peft_version", "qalora_group_size", "megatron_core", "auto_mapping"}

# Default targets when ``target_modules`` is None, by ``config.model_type`` (the same choice PEFT makes).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

# Heads that a task adds to ``modules_to_save`` (newly initialised, so they must train and be saved).
TASK_HEADS: dict[TaskType, list[str]] = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}

InitLoraWeights = bool | Literal["gaussian", "loftq"]


def _enum_value(value: Any, enum_cls: type[enum.Enum], field_name: str) -> Any:
    if value is None or isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except (ValueError, TypeError):
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ConfigError(f"{field_name}={value!r} is not known; accepted: {accepted}") from None


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter (Hu et al. 2021, arXiv 2106.09685).

    The adapted layer computes ``h = W x + s · B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)`` and
    ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``).
    """

    r: int = 8
    """Rank of the update ΔW = BA. Trainable parameters per layer: r·(in + out) instead of in·out."""
    lora_alpha: float = 8
    """Numerator of the scaling s = α/r. Keeping α fixed while changing r keeps the update's size stable."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1). 0 uses ``nn.Identity`` (no cost)."""
    target_modules: list[str] | str | None = None
    """Modules to adapt: a list of names (matched as the full name or a dotted suffix), one regex matched
    against the full name, or ``"all-linear"`` (every Linear/Conv1D except the output head). None picks the
    architecture's default (``DEFAULT_TARGET_MODULES``)."""
    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, with the same matching rules as ``target_modules``."""
    fan_in_fan_out: bool = False
    """Kept for PEFT compatibility. lorakit reads the weight layout from the layer type (transformers'
    ``Conv1D`` stores (in, out)), so this flag never needs setting."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train and are saved with the adapter: none, every bias, or those of adapted layers."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = α/√r (Kalajdzievski 2023, arXiv 2312.03732), better for large r."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter, e.g. a new classifier head."""
    init_lora_weights: InitLoraWeights = True
    """True: A Kaiming-uniform (as ``nn.Linear``), B = 0, so the model starts equal to the base.
    "gaussian": A ~ N(0, 1/r), B = 0. False: A and B both random (ΔW ≠ 0; for tests). "loftq": LoftQ
    (arXiv 2310.08659) on a full-precision model: each adapted weight becomes its NF4 round trip Q and B, A
    start at the rank-r SVD of W − Q, so Q + s·BA ≈ W; then ``lorakit.quantize`` stores Q in 4 bits."""
    loftq_config: dict[str, Any] = field(default_factory=dict)
    """With ``init_lora_weights="loftq"``: ``{"loftq_bits": 4, "loftq_iter": T}`` (PEFT's LoftQConfig fields)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt layers with these indices (the number after ``layers_pattern`` in the module name)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list, e.g. "layers" or "h", used to read the index for ``layers_to_transform``."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overriding ``r``: {name or regex suffix: rank}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overriding ``lora_alpha``: {name or regex suffix: alpha}."""
    task_type: TaskType | str | None = None
    """What the model is for (see :class:`TaskType`); picks the task wrapper and default trainable heads."""
    inference_mode: bool = False
    """True when the adapter is loaded for inference only: its weights are frozen."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; filled in when the adapter is created if left None."""
    revision: str | None = None
    """Hub revision of the base model, for the record."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ per output feature, with a
    trainable magnitude m (one value per output feature, out extra parameters per layer). The paper reports
    1–4 points over LoRA at the same rank; lorakit computes the norm without materialising W + s·BA."""
    dora_grad_through_norm: bool = False
    """DoRA only: backpropagate through ‖W + s·BA‖ (paper eq. 5 as written). The default treats it as a
    constant in backward (paper §4.3: about −24% training memory for ~0.2 points). lorakit-only field, written
    to ``adapter_config.json`` only when True (PEFT ignores it)."""
    peft_type: PeftType | str = PeftType.LORA
    """The method; always LORA for this class."""

    #: The ``peft_type`` this class describes (subclasses describe their own method).
    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA

    def __post_init__(self) -> None:
        self.peft_type = _enum_value(self.peft_type, PeftType, "peft_type")
        if self.peft_type != self.PEFT_TYPE:
            raise ConfigError(
                f"{type(self).__name__} got peft_type={self.peft_type.value!r}; it only describes "
                f"{self.PEFT_TYPE.value!r}"
            )
        self.task_type = _enum_value(self.task_type, TaskType, "task_type")
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} is invalid; the rank must be a positive integer such as 8 or 16")
        _check_positive_number("lora_alpha", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} is invalid; accepted: a number in [0, 1)")
        if not isinstance(self.bias, str) or self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is invalid; accepted: 'none', 'all', 'lora_only'")
        if not any(self.init_lora_weights is v for v in (True, False)) and self.init_lora_weights not in _INITS:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; "
                "accepted: True, False, 'gaussian', 'loftq'"
            )
        for name in ("fan_in_fan_out", "use_rslora", "inference_mode", "use_dora", "dora_grad_through_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; accepted: true or false (a boolean)")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; accepted: a string or null")
        if dataclasses.is_dataclass(self.loftq_config):  # PEFT's LoftQConfig object
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if self.loftq_config is None:
            self.loftq_config = {}
        if not isinstance(self.loftq_config, dict):
            raise ConfigError(f"loftq_config={self.loftq_config!r} is invalid; accepted: {{'loftq_bits': 4, ...}}")
        unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
        if unknown:
            raise ConfigError(f"loftq_config has unknown keys {sorted(unknown)}; accepted: loftq_bits, loftq_iter")
        for key, value in self.loftq_config.items():
            _check_positive_int(f"loftq_config[{key!r}]", value)
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
        self.target_modules = _name_selector("target_modules", self.target_modules)
        self.exclude_modules = _name_selector("exclude_modules", self.exclude_modules)
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
        if _is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, (list, tuple)):
                raise ConfigError(
                    f"layers_to_transform={self.layers_to_transform!r} is invalid; accepted: a layer index or a list "
                    "of them"
                )
            bad = [i for i in self.layers_to_transform if not _is_int(i) or i < 0]
            if bad:
                raise ConfigError(f"layers_to_transform holds {bad!r}; accepted: non-negative layer indices")
            self.layers_to_transform = list(self.layers_to_transform)
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str)
            or (isinstance(self.layers_pattern, (list, tuple)) and all(isinstance(p, str) for p in self.layers_pattern))
        ):
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} is invalid; accepted: the name of the layer list such as "
                "'layers' or 'h', a list of such names, or null"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be combined with a regex target_modules; "
                "encode the layer indices in the regex instead"
            )
        self._check_rank_pattern()
        if self.alpha_pattern is None:
            self.alpha_pattern = {}
        _check_pattern_dict("alpha_pattern", self.alpha_pattern, "{'q_proj': 32}")
        for key, alpha in self.alpha_pattern.items():
            _check_positive_number(f"alpha_pattern[{key!r}]", alpha)
        if self.dora_grad_through_norm and not self.use_dora:
            raise ConfigError("dora_grad_through_norm=True needs use_dora=True; it only changes DoRA's backward pass")

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            self.rank_pattern = {}
        _check_pattern_dict("rank_pattern", self.rank_pattern, "{'q_proj': 16}")
        for key, rank in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{key!r}]", rank)

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with PEFT's keys (sets become sorted lists, enums their values)."""
        out: dict[str, Any] = {}
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
        if not self.dora_grad_through_norm:
            del out["dora_grad_through_norm"]  # keep the file identical to PEFT's unless the option is used
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from a dict such as a parsed ``adapter_config.json`` written by PEFT or lorakit.

        Raises:
            ConfigError: unknown ``peft_type``, a PEFT feature lorakit does not implement switched on, or an
                invalid field value.
        """
        data = dict(data)
        peft_type = data.get("peft_type", "LORA")
        peft_type = _enum_value(peft_type, PeftType, "peft_type")
        if peft_type not in SUPPORTED_PEFT_TYPES:
            supported = ", ".join(repr(t.value) for t in SUPPORTED_PEFT_TYPES)
            raise ConfigError(f"peft_type={peft_type.value!r} is not supported by lorakit; supported: {supported}")
        if peft_type != cls.PEFT_TYPE:
            target = CONFIG_CLASSES[peft_type]
            if not issubclass(target, cls):  # AdaLoraConfig.from_dict on a plain LoRA file, for instance
                raise ConfigError(f"this adapter is {peft_type.value!r}; {cls.__name__} reads {cls.PEFT_TYPE.value!r}")
            cls = target
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_INERT_FIELDS:
                if key not in _ANY_VALUE_FIELDS and value != _PEFT_INERT_FIELDS[key] and value not in (None, {}):
                    raise ConfigError(
                        f"this adapter uses {key}={value!r}, a PEFT feature lorakit does not implement; "
                        f"lorakit loads adapters with {key}={_PEFT_INERT_FIELDS[key]!r}"
                    )
            else:
                warnings.warn(f"ignoring unknown adapter config field {key!r}", stacklevel=2)
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and (init in _PEFT_CREATION_INITS or init.startswith("pissa_niter_")):
            kwargs["init_lora_weights"] = True  # PEFT's other inits (pissa, olora, eva...) only matter at creation
        return cls(**kwargs)

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

    def to_json(self) -> str:
        """The JSON text PEFT writes: two-space indent, sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> LoraConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself); ``kwargs`` override its fields.

        Raises:
            AdapterFileError: the file is missing or is not valid JSON.
        """
        from lorakit.io import resolve_adapter_file

        file = resolve_adapter_file(path, CONFIG_NAME, subfolder=subfolder)
        data = read_json(file)
        data.update(kwargs)
        return cls.from_dict(data)

    @property
    def is_prompt_learning(self) -> bool:
        """False: LoRA changes weights, it adds no virtual tokens (PEFT attribute, read by some tools)."""
        return False


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ΔW = P Λ Q in SVD form with an adaptive rank.

    Each adapted layer holds ``init_r`` triplets: ``lora_A`` (Q, ``(init_r, in)``), ``lora_E`` (Λ,
    ``(init_r, 1)``) and ``lora_B`` (P, ``(out, init_r)``); ΔW = α/(init_r + 1e-5) · B (A ⊙ E). Training scores
    every triplet by the smoothed sensitivity |w · ∂L/∂w| times its uncertainty, and a cubic schedule lowers the
    total rank kept from ``init_r`` per layer to ``target_r`` per layer on average between step ``tinit`` and
    ``total_step − tfinal``, zeroing the least important triplets (λ = 0) every ``deltaT`` steps. The loss gains
    ``orth_reg_weight`` · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F) to keep P and Q near-orthogonal. ``r`` is not used.

    PEFT's field names, defaults and file format; the fields below are AdaLoRA's, the others are LoRA's.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA

    target_r: int = 8
    """Average rank per adapted matrix when the schedule ends (the total budget is target_r × matrices)."""
    init_r: int = 12
    """Rank every adapted matrix starts with."""
    tinit: int = 0
    """Steps of warm-up at the full budget before ranks are cut."""
    tfinal: int = 0
    """Steps at the end that train the final ranks with no further cuts."""
    deltaT: int = 1
    """Cut ranks every deltaT steps during the budget phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |w · ∂L/∂w| (0 < beta1 < 1)."""
    beta2: float = 0.85
    """EMA factor of the uncertainty |sensitivity − its EMA| (0 < beta2 < 1)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty added to the loss in training (0 turns it off)."""
    total_step: int | None = None
    """Optimizer steps of the whole run; required (the schedule is laid out over it)."""
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]
    """Filled in by training: per adapted module (``<module>.lora_E``), which of its ``init_r`` triplets are
    kept. Saved adapters hold only the kept triplets; loading rebuilds each layer at its kept rank."""
    peft_type: PeftType | str = PeftType.ADALORA

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_r", "init_r", "deltaT", "total_step"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                hint = "; AdaLoRA lays its schedule out over the run's optimizer steps" if name == "total_step" else ""
                raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive integer{hint}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; accepted: an integer >= 0")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                f"tinit + tfinal = {self.tinit} + {self.tfinal} >= total_step = {self.total_step}: no step is left to "
                "cut ranks in; lower tinit/tfinal or raise total_step"
            )
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} > init_r={self.init_r}; AdaLoRA only lowers ranks")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value!r} is invalid; accepted: a number strictly between 0 and 1")
        if (
            isinstance(self.orth_reg_weight, bool)
            or not isinstance(self.orth_reg_weight, (int, float))
            or not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0)
        ):
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} is invalid; accepted: a number >= 0")
        if self.use_dora:
            raise ConfigError("AdaLoRA does not combine with DoRA (use_dora=True); use LoraConfig for DoRA")
        if self.init_lora_weights == "loftq":
            raise ConfigError("AdaLoRA does not combine with LoftQ; use LoraConfig for init_lora_weights='loftq'")
        if self.r != 8:
            warnings.warn(f"AdaLoRA ignores r={self.r}; every layer starts at init_r={self.init_r}", stacklevel=3)

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        _check_pattern_dict("rank_pattern", self.rank_pattern, "None or {module: [bool]}", regex=False)
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
                raise ConfigError(f"rank_pattern[{key!r}] is invalid; AdaLoRA's entries are lists of booleans")

    @property
    def kept_ranks(self) -> dict[str, int] | None:
        """Rank kept per module (``rank_pattern`` counted), or None before the schedule has cut anything."""
        if self.rank_pattern is None:
            return None
        return {key.removesuffix(".lora_E"): sum(mask) for key, mask in self.rank_pattern.items()}


#: Config class by ``peft_type``: what :meth:`LoraConfig.from_dict` builds for a file.
CONFIG_CLASSES: dict[PeftType, type[LoraConfig]] = {PeftType.LORA: LoraConfig, PeftType.ADALORA: AdaLoraConfig}


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


#: ``init_lora_weights`` values lorakit runs.
_INITS = ("gaussian", "loftq")
#: PEFT's initialisations that only shape the adapter when it is created: a saved adapter of theirs loads as-is.
_PEFT_CREATION_INITS = ("pissa", "olora", "eva", "corda", "orthogonal", "lora_ga")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive integer such as 8 or 16")


def _check_positive_number(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive finite number such as 16")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def _check_pattern_dict(name: str, value: Any, example: str, regex: bool = True) -> None:
    """A ``{module name or regex: value}`` dict with string keys (each a valid regex when ``regex``)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a dict of module names (or regexes), e.g. {example}")
    if regex:
        for key in value:
            _check_regex(f"{name} key", key)


def _name_selector(name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return value
    if isinstance(value, str):
        if value != "all-linear":
            _check_regex(name, value)
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(f"{name}={value!r} is invalid; accepted: a list of module names, a regex string, or None")
