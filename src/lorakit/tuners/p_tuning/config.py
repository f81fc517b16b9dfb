"""P-tuning's configuration: :class:`PromptEncoderConfig` and :class:`PromptEncoderReparameterizationType` (Liu et
al. 2021, arXiv 2103.10385), PEFT's fields and defaults."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.config import PeftType, check_positive_int, enum_value, is_number
from lorakit.errors import ConfigError
from lorakit.tuners.prompt_learning.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that computes the prompt from the trained embeddings (the paper's prompt encoder, §3.2)."""

    MLP = "MLP"
    """Three linear layers with ReLU between them (PEFT's default)."""
    LSTM = "LSTM"
    """A bidirectional LSTM followed by a two-layer MLP (the paper's choice)."""


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of one P-tuning adapter (Liu et al. 2021, arXiv 2103.10385, §3).

    Trained embeddings h go through a small network f (the prompt encoder) and the model runs on
    ``[f(h); embed(x)]``. The file stores f(h), so an adapter loaded from a file runs (and trains) without f.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    """The prompt encoder f: ``MLP`` or ``LSTM``."""
    encoder_hidden_size: int | None = None
    """Hidden width of f. None: ``token_dim``."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has 3 linear layers; another value is ignored with a warning, as in PEFT)."""
    encoder_dropout: float = 0.0
    """Dropout between the LSTM's layers."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING
    NAME: ClassVar[str] = "P-tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = enum_value(
            self.encoder_reparameterization_type, PromptEncoderReparameterizationType, "encoder_reparameterization_type"
        )
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        dropout = self.encoder_dropout
        if not is_number(dropout) or not math.isfinite(dropout) or not 0 <= dropout < 1:
            raise ConfigError(f"encoder_dropout={dropout!r} is invalid; accepted: a probability in [0, 1), e.g. 0.1")

    def fill_from_model(self, model_config: Any) -> None:
        super().fill_from_model(model_config)
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    def for_loading(self) -> PromptEncoderConfig:
        """A file holds the encoder's output only, so it loads for inference (PEFT refuses a trainable load too).

        Raises:
            ConfigError: the load asked for a trainable adapter (``is_trainable=True``).
        """
        if not self.inference_mode:
            raise ConfigError(
                "a P-tuning adapter file holds only the prompt its encoder computed (prompt_embeddings), not the "
                "encoder, so it loads for inference only: load it with is_trainable=False (PEFT refuses this too)"
            )
        return self

    def summary(self) -> str:
        kind = self.encoder_reparameterization_type.value
        return f"P-tuning: {self.num_virtual_tokens} virtual tokens, {kind} prompt encoder"
