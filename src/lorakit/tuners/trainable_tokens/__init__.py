"""Trainable tokens (PEFT's TrainableTokens): train chosen rows of the input embedding, e.g. newly added special
tokens, and nothing else. :class:`TrainableTokensConfig` is the standalone method; LoRA's
``trainable_token_indices`` trains the same rows beside a LoRA adapter (:mod:`.auxiliary`)."""

from lorakit.tuners.trainable_tokens.config import TrainableTokensConfig

__all__ = ["TrainableTokensConfig"]
