"""P-tuning's tuner: the shared prompt-learning engine with :class:`PromptEncoder` as encoder."""

from __future__ import annotations

from lorakit.config import register_method
from lorakit.tuners.p_tuning.config import PromptEncoderConfig
from lorakit.tuners.p_tuning.encoder import PromptEncoder
from lorakit.tuners.prompt_learning.model import PromptLearningModel


class PTuningModel(PromptLearningModel):
    """A model with P-tuning adapters (Liu et al. 2021, arXiv 2103.10385): see
    :class:`~lorakit.tuners.prompt_learning.model.PromptLearningModel`."""

    config_class = PromptEncoderConfig

    def _build_encoder(self, config: PromptEncoderConfig) -> PromptEncoder:
        return PromptEncoder(config)


register_method(PromptEncoderConfig, PTuningModel)
