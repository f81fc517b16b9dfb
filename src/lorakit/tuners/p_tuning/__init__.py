"""P-tuning (Liu et al. 2021, arXiv 2103.10385): virtual-token embeddings computed by a small prompt encoder (MLP
or LSTM), prepended to the input's. Config here, encoder in :mod:`.encoder`, tuner (one registration line) in
:mod:`.model`."""

from lorakit.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]
