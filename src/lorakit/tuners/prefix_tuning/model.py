"""Prefix tuning's tuner: the shared prompt-learning engine with :class:`PrefixEncoder` as encoder and the prompt
given to the model as past keys and values."""

from __future__ import annotations

from lorakit.config import register_method
from lorakit.errors import ConfigError
from lorakit.tuners.prefix_tuning.config import PrefixTuningConfig
from lorakit.tuners.prefix_tuning.encoder import PrefixEncoder
from lorakit.tuners.prompt_learning.cache import cache_argument
from lorakit.tuners.prompt_learning.model import PromptLearningModel


class PrefixTuningModel(PromptLearningModel):
    """A model with prefix-tuning adapters (Li & Liang 2021, arXiv 2101.00190): see
    :class:`~lorakit.tuners.prompt_learning.model.PromptLearningModel`.

    Attributes:
        cache_name: the model's cache argument (``cache`` in transformers 5, ``past_key_values`` before).
    """

    config_class = PrefixTuningConfig
    prompt_in_cache = True

    def _check_model(self, config: PrefixTuningConfig) -> None:
        """Refuse a model whose forward takes no key/value cache, or that checkpoints activations (the prefix
        is a cache, which re-entrant checkpointing would replay into twice; PEFT refuses it too)."""
        name = cache_argument(self.model)
        if name is None:
            raise ConfigError(
                f"{type(self.model).__name__}.forward takes no key/value cache (cache or past_key_values), which "
                "prefix tuning gives its prefix through; use prompt tuning or P-tuning with this model"
            )
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ConfigError(
                "prefix tuning does not work with activation (gradient) checkpointing, which is on for this model; "
                "turn it off (model.gradient_checkpointing_disable()) or use prompt tuning"
            )
        self.cache_name = name

    def _build_encoder(self, config: PrefixTuningConfig) -> PrefixEncoder:
        return PrefixEncoder(config)


register_method(PrefixTuningConfig, PrefixTuningModel)
