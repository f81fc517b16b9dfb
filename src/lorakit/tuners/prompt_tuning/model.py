"""Prompt tuning's tuner: the shared prompt-learning engine with :class:`PromptEmbedding` as encoder."""

from __future__ import annotations

from lorakit.config import register_method
from lorakit.tuners.prompt_learning.model import PromptLearningModel
from lorakit.tuners.prompt_tuning.config import PromptTuningConfig
from lorakit.tuners.prompt_tuning.encoder import PromptEmbedding


class PromptTuningModel(PromptLearningModel):
    """A model with prompt-tuning adapters (Lester et al. 2021, arXiv 2104.08691): see
    :class:`~lorakit.tuners.prompt_learning.model.PromptLearningModel`."""

    config_class = PromptTuningConfig

    def _build_encoder(self, config: PromptTuningConfig) -> PromptEmbedding:
        return PromptEmbedding(config, self.word_embeddings)


register_method(PromptTuningConfig, PromptTuningModel)
