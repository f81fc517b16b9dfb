"""LoRA's configuration: :class:`LoraConfig` (Hu et al. 2021, arXiv 2106.09685), PEFT's fields and defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lorakit.config import (
    PeftConfig,
    PeftType,
    check_bool,
    check_pattern_dict,
    check_positive_int,
    check_positive_number,
    is_int,
    is_number,
    name_selector,
    pattern_value,
)
from lorakit.errors import ConfigError, ShapeMismatchError

# Fields PEFT writes that lorakit does not implement, with the value that means "feature off". A config
# holding the off value loads silently; any other value is refused, because ignoring it would give a model
# that differs from the one the adapter was trained on.
_PEFT_INERT_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
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
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
_ANY_VALUE_FIELDS = ("qalora_group_size", "megatron_core")


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

InitLoraWeights = bool | Literal["gaussian", "loftq"]
#: ``init_lora_weights`` values lorakit runs.
_INITS = ("gaussian", "loftq")
#: PEFT's initialisations that only shape the adapter when it is created: a saved adapter of theirs loads as-is.
_PEFT_CREATION_INITS = ("pissa", "olora", "eva", "corda", "orthogonal", "lora_ga")
_RANK_KEYS = (".lora_A.weight", ".lora_embedding_A")
_KEY_PREFIX = "base_model.model."


@dataclass
class LoraConfig(PeftConfig):
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
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ per output feature, with a
    trainable magnitude m (one value per output feature, out extra parameters per layer). The paper reports
    1–4 points over LoRA at the same rank; lorakit computes the norm without materialising W + s·BA."""
    dora_grad_through_norm: bool = False
    """DoRA only: backpropagate through ‖W + s·BA‖ (paper eq. 5 as written). The default treats it as a
    constant in backward (paper §4.3: about −24% training memory for ~0.2 points). lorakit-only field, written
    to ``adapter_config.json`` only when True (PEFT ignores it)."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    NAME: ClassVar[str] = "LoRA"
    INERT_FIELDS: ClassVar[dict[str, Any]] = _PEFT_INERT_FIELDS
    INFORMATIONAL_FIELDS: ClassVar[tuple[str, ...]] = (*PeftConfig.INFORMATIONAL_FIELDS, *_ANY_VALUE_FIELDS)
    #: Targets when ``target_modules`` is None, by ``config.model_type`` (read by :mod:`lorakit.targeting`).
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = DEFAULT_TARGET_MODULES
    FILE_PREFIX: ClassVar[str] = "lora_"

    def summary(self) -> str:
        method = "DoRA (magnitude + direction)" if self.use_dora else "LoRA"
        scaling = self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)
        line = f"r={self.r}  lora_alpha={self.lora_alpha:g}  scaling={scaling:.4g}  {method}"
        return line + (f"\nrank_pattern {self.rank_pattern}" if self.rank_pattern else "")

    def rank_of(self, tensor: str, shape: list[int]) -> int | None:
        return shape[0] if tensor in ("lora_A", "lora_embedding_A") else None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.r) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} is invalid; the rank must be a positive integer such as 8 or 16")
        check_positive_number("lora_alpha", self.lora_alpha)
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} is invalid; accepted: a number in [0, 1)")
        if not isinstance(self.bias, str) or self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} is invalid; accepted: 'none', 'all', 'lora_only'")
        if not any(self.init_lora_weights is v for v in (True, False)) and self.init_lora_weights not in _INITS:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; "
                "accepted: True, False, 'gaussian', 'loftq'"
            )
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "dora_grad_through_norm"):
            check_bool(name, getattr(self, name))
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
            check_positive_int(f"loftq_config[{key!r}]", value)
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
        self.target_modules = name_selector("target_modules", self.target_modules)
        self.exclude_modules = name_selector("exclude_modules", self.exclude_modules)
        if is_int(self.layers_to_transform):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            if not isinstance(self.layers_to_transform, (list, tuple)):
                raise ConfigError(
                    f"layers_to_transform={self.layers_to_transform!r} is invalid; accepted: a layer index or a list "
                    "of them"
                )
            bad = [i for i in self.layers_to_transform if not is_int(i) or i < 0]
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
        check_pattern_dict("alpha_pattern", self.alpha_pattern, "{'q_proj': 32}")
        for key, alpha in self.alpha_pattern.items():
            check_positive_number(f"alpha_pattern[{key!r}]", alpha)
        if self.dora_grad_through_norm and not self.use_dora:
            raise ConfigError("dora_grad_through_norm=True needs use_dora=True; it only changes DoRA's backward pass")

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            self.rank_pattern = {}
        check_pattern_dict("rank_pattern", self.rank_pattern, "{'q_proj': 16}")
        for key, rank in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", rank)

    # -- what the generic level asks ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not self.dora_grad_through_norm:
            del out["dora_grad_through_norm"]  # keep the file identical to PEFT's unless the option is used
        return out

    @classmethod
    def fields_from_file(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and (init in _PEFT_CREATION_INITS or init.startswith("pissa_niter_")):
            kwargs["init_lora_weights"] = True  # PEFT's other inits (pissa, olora, eva...) only matter at creation
        return kwargs

    def for_loading(self) -> LoraConfig:
        """The file's weights replace whatever the init chose, and an init that rewrites the base (LoftQ writes Q
        into it) must not run: the base is the one the adapter was trained on."""
        if self.init_lora_weights != "loftq":
            return self
        return dataclasses.replace(self, init_lora_weights=True)

    def rank_for(self, module: str) -> tuple[int, str]:
        """The rank this config gives ``module``, and where it comes from (for messages)."""
        return pattern_value(self.rank_pattern, module, self.r), "r / rank_pattern"

    def check_file(self, state: dict[str, Any]) -> None:
        """Refuse ranks that disagree with the factors of the weights file, before any layer is allocated.

        A factor A has the rank as its first dimension (``(r, in)``, ``(r, in, k, k)``, embeddings ``(r, num)``),
        so a config claiming ``r = 10**9`` for a rank-8 file is refused here, not after allocating gigabytes.

        Raises:
            ShapeMismatchError: naming the first module whose rank differs, with both values.
        """
        for key, tensor in state.items():
            suffix = next((s for s in _RANK_KEYS if key.endswith(s)), None)
            if suffix is None or tensor.dim() < 2:  # a factor is at least (r, in); anything else fails the key check
                continue
            module = key[: -len(suffix)].removeprefix(_KEY_PREFIX)
            expected, what = self.rank_for(module)
            if expected != tensor.shape[0]:
                raise ShapeMismatchError(
                    f"the adapter config asks for rank {expected} ({what}) for {module!r} but the weights file holds "
                    f"rank {tensor.shape[0]} there ({key!r}); the config and the weights do not belong together"
                )
