"""Prompt tuning's configuration: :class:`PromptTuningConfig` and :class:`PromptTuningInit` (Lester et al. 2021,
arXiv 2104.08691), PEFT's fields and defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.config import PeftType, enum_value
from lorakit.errors import ConfigError
from lorakit.tuners.prompt_learning.config import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the prompt starts (the paper's §3.2 compares them)."""

    TEXT = "TEXT"
    """The embeddings of a text's tokens (``prompt_tuning_init_text``), repeated or cut to the prompt length."""
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    """The embeddings of tokens drawn uniformly from the vocabulary."""
    RANDOM = "RANDOM"
    """Random vectors, N(0, 1) (torch's embedding init; they may fall outside the embedding manifold)."""


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of one prompt-tuning adapter (Lester et al. 2021, arXiv 2104.08691, §2).

    The adapter is a matrix P of ``num_virtual_tokens`` rows of width ``token_dim``; the model runs on
    ``[P; embed(x)]``, its input embeddings with P prepended. Only P trains: ``num_virtual_tokens * token_dim``
    values (20 tokens on a 4096-wide model: 81,920).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    """How P starts: ``RANDOM``, ``SAMPLE_VOCAB`` or ``TEXT`` (see :class:`PromptTuningInit`)."""
    prompt_tuning_init_text: str | None = None
    """The text whose token embeddings start P; required with ``TEXT``, used only then."""
    tokenizer_name_or_path: str | None = None
    """The tokenizer for ``prompt_tuning_init_text``: a local tokenizer folder (lorakit never downloads). Required
    with ``TEXT``."""
    tokenizer_kwargs: dict[str, Any] | None = None
    """Extra arguments for ``AutoTokenizer.from_pretrained`` (only with ``TEXT``). ``trust_remote_code`` is
    refused: lorakit runs no code from a folder."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    NAME: ClassVar[str] = "prompt tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = enum_value(self.prompt_tuning_init, PromptTuningInit, "prompt_tuning_init")
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; accepted: a string or null")
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError(
                "prompt_tuning_init='TEXT' needs tokenizer_name_or_path: the folder of the tokenizer that turns "
                "prompt_tuning_init_text into tokens"
            )
        if text and self.prompt_tuning_init_text is None:
            raise ConfigError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text that starts the prompt"
            )
        if self.tokenizer_kwargs is not None and not (
            isinstance(self.tokenizer_kwargs, dict) and all(isinstance(k, str) for k in self.tokenizer_kwargs)
        ):
            raise ConfigError(
                f"tokenizer_kwargs={self.tokenizer_kwargs!r} is invalid; accepted: a dict of keyword arguments for "
                "AutoTokenizer.from_pretrained, or null"
            )
        if self.tokenizer_kwargs and not text:
            raise ConfigError(
                "tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it or use TEXT initialisation"
            )

    def summary(self) -> str:
        return f"prompt tuning: {self.num_virtual_tokens} virtual tokens ({self.prompt_tuning_init.value} init)"
