"""Prefix tuning's configuration: :class:`PrefixTuningConfig` (Li & Liang 2021, arXiv 2101.00190), PEFT's fields
and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.config import PeftType, check_bool, check_positive_int
from lorakit.errors import ConfigError
from lorakit.tuners.prompt_learning.config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of one prefix-tuning adapter (Li & Liang 2021, arXiv 2101.00190, §4).

    Every attention layer attends to ``num_virtual_tokens`` extra key/value pairs, the prefix P, before the
    input's own: ``P`` has ``num_virtual_tokens`` rows of width ``num_layers * 2 * token_dim`` (a key and a value
    per layer). With ``prefix_projection`` P is computed from smaller embeddings by a two-layer MLP
    ``P = W2 tanh(W1 E)``, the reparameterization of the paper's §4.3 that stabilises training.
    """

    encoder_hidden_size: int | None = None
    """Hidden width of the projection MLP (with ``prefix_projection``). None: ``token_dim``."""
    prefix_projection: bool = False
    """Compute the prefix with an MLP from ``token_dim``-wide embeddings (the paper's reparameterization)."""
    init_weights: str | None = None
    """None: random start; ``"zero"``: the prefix (or the projection's last layer) starts at zero."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING
    NAME: ClassVar[str] = "prefix tuning"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_bool("prefix_projection", self.prefix_projection)
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid; accepted: null (random) or 'zero'")
        if self.token_dim is not None and self.num_attention_heads is not None:
            if self.token_dim % self.num_attention_heads:
                raise ConfigError(
                    f"token_dim={self.token_dim} does not split into num_attention_heads={self.num_attention_heads} "
                    "heads; the prefix holds one key and one value per head, so token_dim must be a multiple of it"
                )

    def fill_from_model(self, model_config: Any) -> None:
        """As for every prompt-learning config; on grouped-query attention the prefix is as wide as one layer's
        keys, ``head_dim * num_key_value_heads`` (PEFT's rule)."""
        super().fill_from_model(model_config)
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
        data = data.get("text_config") or data
        if data.get("num_key_value_heads") is not None:
            head_dim = data.get("head_dim") or self.token_dim // self.num_attention_heads
            self.token_dim = head_dim * data["num_key_value_heads"]
            self.num_attention_heads = data["num_key_value_heads"]
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    def prompt_shape(self) -> tuple[int, int] | None:
        if self.token_dim is None or self.num_layers is None:
            return None
        return (self.num_virtual_tokens, self.num_layers * 2 * self.token_dim)

    def for_loading(self) -> PrefixTuningConfig:
        """A projected prefix's file holds the MLP's output only, so it loads for inference (as in PEFT).

        Raises:
            ConfigError: a trainable load (``is_trainable=True``) of a ``prefix_projection`` adapter.
        """
        if self.prefix_projection and not self.inference_mode:
            raise ConfigError(
                "a prefix-tuning file with prefix_projection=True holds only the prefix its MLP computed "
                "(prompt_embeddings), not the MLP, so it loads for inference only: load it with is_trainable=False"
            )
        return self

    def summary(self) -> str:
        projected = ", projected by an MLP" if self.prefix_projection else ""
        return f"prefix tuning: {self.num_virtual_tokens} virtual key/value pairs per layer{projected}"
