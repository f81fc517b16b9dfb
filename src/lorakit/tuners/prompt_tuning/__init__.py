"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691): a learned prompt of virtual-token embeddings, prepended
to the input's. Config here, encoder in :mod:`.encoder`, tuner (one registration line) in :mod:`.model`."""

from lorakit.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit

__all__ = ["PromptTuningConfig", "PromptTuningInit"]
