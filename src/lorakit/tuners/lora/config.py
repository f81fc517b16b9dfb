"""LoRA's configuration: :class:`LoraConfig` (Hu et al. 2021, arXiv 2106.09685), PEFT's fields and defaults."""

from __future__ import annotations

import dataclasses
import re
import warnings
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
from lorakit.tuners.lora.param_names import parameter_ranks
from lorakit.tuners.lora.subconfigs import CordaConfig, EvaConfig, as_subconfig

# Fields PEFT writes that lorakit does not implement, with the value that means "feature off". A config
# holding the off value loads silently; any other value is refused, because ignoring it would give a model
# that differs from the one the adapter was trained on.
_PEFT_INERT_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "velora_config": None,
}
# PEFT fields lorakit holds but refuses to switch on, each with why (``LoraConfig(layer_replication=...)`` and a
# file holding it fail alike, naming the field).
_REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "layer_replication": (
        None,
        "it builds a deeper model from repeated base layers that share weights (PEFT's replicate_layers, for "
        "LLaMA-style decoders); lorakit adapts the model's own layers only",
    ),
    "use_qalora": (
        False,
        "QA-LoRA (arXiv 2309.14717) pools the adapter's input per group so the update folds into a GPTQ/AWQ "
        "quantized weight; lorakit adapts bitsandbytes-quantized layers (QLoRA), not GPTQ/AWQ ones",
    ),
    "megatron_config": (
        None,
        "it targets Megatron-LM's tensor-parallel layers; lorakit adapts torch.nn, transformers and bitsandbytes "
        "layers and scales out with DDP or FSDP (lorakit train --fsdp)",
    ),
}


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

InitLoraWeights = bool | Literal["gaussian", "loftq", "pissa", "olora", "orthogonal", "corda", "eva"] | str
#: ``init_lora_weights`` values lorakit runs (and ``"pissa_niter_<k>"``).
_INITS = ("gaussian", "loftq", "pissa", "olora", "orthogonal", "corda", "eva")
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
#: PEFT's initialisations lorakit does not run; a saved adapter made with one loads as-is (its weights are the file's).
_PEFT_CREATION_INITS = ("lora_ga",)
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
    start at the rank-r SVD of W − Q, so Q + s·BA ≈ W; then ``lorakit.quantize`` stores Q in 4 bits. "pissa" /
    "pissa_niter_<k>" (arXiv 2404.02948), "olora" (arXiv 2406.01775): B, A from W's SVD / QR, W rewritten to the
    residual W − s·BA (re-run when such a file loads, as in PEFT); "orthogonal": BA = 0 with both non-zero
    (:mod:`lorakit.tuners.lora.starts`)."""
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

    target_parameters: list[str] | None = None
    """Parameters (not modules) to adapt, by name suffix, e.g. ``["mlp.experts.gate_up_proj"]``: the fused
    expert weights of transformers 5 MoE models (Mixtral, Qwen-MoE), which are ``nn.Parameter`` s and not
    ``nn.Linear`` s, so ``target_modules`` cannot reach them (PEFT 0.17+'s field)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Train only these rows of the input embedding (e.g. newly added special tokens) instead of all of it:
    a list of token ids (for the embedding layer), or ``{module name: ids}``. Saved as the changed rows only."""
    ensure_weight_tying: bool = False
    """Keep tied input and output embeddings tied when one of them is adapted, trained in full
    (``modules_to_save``) or has trainable token rows: the other then gets the same adapter/copy/rows."""
    lora_bias: bool = False
    """Give B a trainable bias (PEFT's ``lora_bias``), added as ``s·b_B`` to the output and merged into the base
    layer's bias. For adapters extracted from full fine-tunes, whose biases changed too."""
    eva_config: Any = None
    """With ``init_lora_weights="eva"``: the :class:`~lorakit.EvaConfig` (or its dict) of the data-driven start."""
    corda_config: Any = None
    """With ``init_lora_weights="corda"``: the :class:`~lorakit.CordaConfig` (or its dict) of CorDA's start."""
    layer_replication: list[list[int]] | None = None
    """PEFT's layer stacking; refused (see ``_REFUSED_FIELDS`` for why)."""
    use_qalora: bool = False
    """QA-LoRA; refused (see ``_REFUSED_FIELDS``)."""
    qalora_group_size: int = 16
    """QA-LoRA's group size; read only with ``use_qalora``."""
    megatron_config: dict[str, Any] | None = None
    """Megatron-LM's parallel layers; refused (see ``_REFUSED_FIELDS``)."""
    megatron_core: str = "megatron.core"
    """Megatron's module path; read only with ``megatron_config``."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LORA
    NAME: ClassVar[str] = "LoRA"
    INERT_FIELDS: ClassVar[dict[str, Any]] = _PEFT_INERT_FIELDS
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
        init = self.init_lora_weights
        if not any(init is v for v in (True, False)) and not (
            isinstance(init, str) and (init in _INITS or _PISSA_NITER.fullmatch(init))
        ):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; accepted: True, False, "
                f"{', '.join(repr(i) for i in _INITS)}, 'pissa_niter_<k>' (k ≥ 1, fast SVD with k subspace iterations)"
            )
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "dora_grad_through_norm", "ensure_weight_tying"):
            check_bool(name, getattr(self, name))
        self._check_new_fields()
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
        for name, start, cls in (("eva_config", "eva", EvaConfig), ("corda_config", "corda", CordaConfig)):
            value = as_subconfig(name, getattr(self, name), cls)  # a dict from adapter_config.json becomes a cls
            if value is None and self.init_lora_weights == start:  # PEFT's default and warning
                warnings.warn(
                    f"init_lora_weights={start!r} without {name}: using the default {cls.__name__}()", stacklevel=3
                )
                value = cls()
            elif value is not None and self.init_lora_weights != start:
                warnings.warn(
                    f"{name} is ignored: init_lora_weights is {self.init_lora_weights!r}, not {start!r}", stacklevel=3
                )
            setattr(self, name, value)
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

    def _check_new_fields(self) -> None:
        """``target_parameters``, ``trainable_token_indices``, ``lora_bias`` and the refused PEFT fields."""
        for name, (off, why) in _REFUSED_FIELDS.items():
            value = getattr(self, name)
            if value != off and value not in (None, {}, []):
                raise ConfigError(f"{name}={value!r} is not supported by lorakit: {why}; accepted: {off!r}")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not isinstance(self.target_parameters, (list, tuple, set)):
                raise ConfigError(
                    f"target_parameters={self.target_parameters!r} is invalid; accepted: a list of parameter names "
                    "such as ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'], or null"
                )
            if not all(isinstance(p, str) and p for p in self.target_parameters):
                raise ConfigError(f"target_parameters={self.target_parameters!r} must hold non-empty strings")
            self.target_parameters = (
                sorted(self.target_parameters)
                if isinstance(self.target_parameters, set)
                else list(self.target_parameters)
            )
        tokens = self.trainable_token_indices
        if tokens is not None:
            groups = tokens if isinstance(tokens, dict) else {"": tokens}
            for key, ids in groups.items():
                where = f"trainable_token_indices[{key!r}]" if key else "trainable_token_indices"
                if not isinstance(key, str) or not isinstance(ids, (list, tuple)) or not ids:
                    raise ConfigError(
                        f"{where}={ids!r} is invalid; accepted: a non-empty list of token ids such as [0, 32000], or "
                        "{'embed_tokens': [32000, 32001]}"
                    )
                bad = [i for i in ids if not is_int(i) or i < 0]
                if bad:
                    raise ConfigError(f"{where} holds {bad!r}; accepted: non-negative token ids")
            self.trainable_token_indices = (
                {k: list(v) for k, v in tokens.items()} if isinstance(tokens, dict) else list(tokens)
            )
        check_bool("lora_bias", self.lora_bias)
        if self.lora_bias and self.use_dora:
            raise ConfigError(
                "lora_bias=True is not supported with use_dora=True (as in PEFT): DoRA rescales the "
                "weight's rows, which a bias on B does not follow; set one of them to False"
            )
        if self.lora_bias and not any(self.init_lora_weights is v for v in (True, False)):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights=True or False (as in PEFT), got {self.init_lora_weights!r}: "
                "the other starts set B from the base weight, and a bias on B would shift the model's start"
            )

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            self.rank_pattern = {}
        check_pattern_dict("rank_pattern", self.rank_pattern, "{'q_proj': 16}")
        for key, rank in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", rank)

    # -- what the generic level asks ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in ("eva_config", "corda_config"):  # PEFT writes its sub-configs as dicts
            if dataclasses.is_dataclass(out[name]):
                out[name] = dataclasses.asdict(out[name])
        if not self.dora_grad_through_norm:
            del out["dora_grad_through_norm"]  # keep the file identical to PEFT's unless the option is used
        return out

    @classmethod
    def fields_from_file(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and init in _PEFT_CREATION_INITS:
            kwargs["init_lora_weights"] = True  # an init lorakit does not run: the file's weights are the adapter
        return kwargs

    def for_loading(self) -> LoraConfig:
        """The file's weights replace whatever the init chose, and LoftQ (which writes Q into the base) must not
        run: the base is the one the adapter was trained on. PiSSA and OLoRA do run again, as in PEFT: their
        adapter was trained on the residual ``W − s·B₀A₀`` of the original base, which loading recomputes
        (:mod:`lorakit.tuners.lora.starts`)."""
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
            if any(tensor.shape[0] % r == 0 for r in parameter_ranks(self, module)):
                continue  # a target_parameters factor: r rows per expert (tuners/lora/param_names.py)
            expected, what = self.rank_for(module)
            if expected != tensor.shape[0]:
                raise ShapeMismatchError(
                    f"the adapter config asks for rank {expected} ({what}) for {module!r} but the weights file holds "
                    f"rank {tensor.shape[0]} there ({key!r}); the config and the weights do not belong together"
                )
