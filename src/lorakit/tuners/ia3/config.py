"""IA³'s configuration: :class:`IA3Config` (Liu et al. 2022, arXiv 2205.05638), PEFT's fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorakit.config import PeftConfig, PeftType, check_bool, name_selector
from lorakit.errors import ConfigError

# Default targets when ``target_modules`` is None, by ``config.model_type`` (PEFT's
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING): the paper rescales keys, values and the feedforward
# output projection (§3.3).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

# Default feedforward modules when ``feedforward_modules`` is None (PEFT's
# TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING): the second linear of each feedforward block, whose
# *input* (the block's hidden activation, l_ff in the paper) is rescaled.
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclass
class IA3Config(PeftConfig):
    """Configuration of one IA³ adapter (Liu et al. 2022, arXiv 2205.05638, §3.3).

    Each adapted layer learns one vector l: an attention-like module computes ``h = l ⊙ (W x + b)`` (l has
    ``out_features`` entries), a feedforward module ``h = W (l ⊙ x) + b`` (``in_features`` entries). Nothing else
    trains, so an adapter is tiny: on LLaMA-7B's defaults about 0.006% of the parameters.
    """

    target_modules: list[str] | str | None = None
    """Modules to adapt: a list of names (matched as the full name or a dotted suffix), one regex matched
    against the full name, or ``"all-linear"`` (every Linear/Conv1D except the output head). None picks the
    architecture's default (``DEFAULT_TARGET_MODULES``: keys, values and the feedforward output projection)."""
    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, with the same matching rules as ``target_modules``."""
    feedforward_modules: list[str] | str | None = None
    """Targets whose *input* is rescaled (the paper's l_ff) instead of their output: a list of names (a module
    matches when its full name ends with one, as in PEFT) or one regex matched against the full name. When both
    are lists, a subset of ``target_modules``. None picks the architecture's default
    (``DEFAULT_FEEDFORWARD_MODULES``); ``[]`` means no feedforward module."""
    fan_in_fan_out: bool = False
    """Kept for PEFT compatibility. lorakit reads the weight layout from the layer type (transformers'
    ``Conv1D`` stores (in, out)), so this flag never needs setting."""
    init_ia3_weights: bool = True
    """True: every vector starts at ones, so the adapted model starts equal to the base (the paper's init).
    False: random normal vectors (for tests)."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3
    NAME: ClassVar[str] = "IA³"
    FILE_PREFIX: ClassVar[str] = "ia3_"
    #: Targets when ``target_modules`` is None, by ``config.model_type`` (read by :mod:`lorakit.targeting`).
    DEFAULT_TARGETS: ClassVar[dict[str, list[str]]] = DEFAULT_TARGET_MODULES
    #: Feedforward modules when ``feedforward_modules`` is None, by ``config.model_type``.
    DEFAULT_FEEDFORWARD: ClassVar[dict[str, list[str]]] = DEFAULT_FEEDFORWARD_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = name_selector("target_modules", self.target_modules)
        self.exclude_modules = name_selector("exclude_modules", self.exclude_modules)
        if self.feedforward_modules == "all-linear":
            raise ConfigError(
                "feedforward_modules='all-linear' is not accepted; name the feedforward modules whose input IA³ "
                "rescales, e.g. ['down_proj'], or give a regex"
            )
        self.feedforward_modules = name_selector("feedforward_modules", self.feedforward_modules)
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            check_bool(name, getattr(self, name))
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:  # PEFT refuses this too: a feedforward module that is not a target would never be adapted
                raise ConfigError(
                    f"feedforward_modules holds {extra}, which target_modules={self.target_modules!r} does not; "
                    "feedforward_modules must be a subset of target_modules (add them to target_modules)"
                )

    def summary(self) -> str:
        feedforward = self.feedforward_modules
        shown = "the architecture's default" if feedforward is None else repr(feedforward)
        return f"IA³: learned vectors (outputs rescaled; inputs of feedforward modules {shown})"

    def feedforward_for(self, model_type: str | None) -> list[str] | str:
        """``feedforward_modules`` made concrete: the architecture's default for None (as PEFT fills it in).

        Raises:
            ConfigError: None was given and the architecture has no known default.
        """
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        if model_type not in self.DEFAULT_FEEDFORWARD:
            raise ConfigError(
                f"feedforward_modules is None and lorakit has no default feedforward modules for "
                f"model_type={model_type!r}; set feedforward_modules to the names of the targets whose input IA³ "
                "should rescale, e.g. ['down_proj'], or to [] for none"
            )
        return list(self.DEFAULT_FEEDFORWARD[model_type])
