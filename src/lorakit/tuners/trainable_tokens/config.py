"""The trainable-tokens method's configuration: :class:`TrainableTokensConfig`, PEFT's fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lorakit.config import PeftConfig, PeftType, check_bool, is_int, name_selector
from lorakit.errors import ConfigError


def check_token_ids(where: str, ids: Any) -> list[int]:
    """A non-empty list of non-negative token ids, as a list.

    Raises:
        ConfigError: naming ``where``, the bad value and what is accepted.
    """
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ConfigError(f"{where}={ids!r} is invalid; accepted: a non-empty list of token ids such as [32000, 32001]")
    bad = [i for i in ids if not is_int(i) or i < 0]
    if bad:
        raise ConfigError(f"{where} holds {bad!r}; accepted: non-negative token ids")
    return list(ids)


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Train chosen rows of the input embedding and nothing else (PEFT's TrainableTokens method).

    For new special tokens (after ``resize_token_embeddings``) or retraining a few existing ones: memory and file
    size grow with the number of tokens, not the vocabulary (a file holds ``len(token_indices) × dim`` values per
    layer). A model whose output head shares the embedding's weight (``tie_word_embeddings``) sees the trained rows
    in its head too. To train the rows next to a LoRA adapter, use ``LoraConfig(trainable_token_indices=...)``.
    """

    token_indices: list[int] = field(default_factory=list)
    """The token ids whose embedding rows train (ask the tokenizer: ``tokenizer.convert_tokens_to_ids(...)``)."""
    target_modules: list[str] | str | None = None
    """The embedding layer(s) holding the rows: names (full or a dotted suffix) or one regex matched against the full
    name. None: the model's input embedding (``get_input_embeddings()``; else ``embed_tokens``)."""
    init_weights: bool = True
    """True: the rows start as the base rows (the model starts unchanged). False: random rows (for tests)."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS
    NAME: ClassVar[str] = "trainable tokens"
    FILE_PREFIX: ClassVar[str] = "trainable_tokens_"
    #: Its layers tie a head sharing the embedding's weight themselves (lorakit.tuners.tying reads this).
    TIES_ITSELF: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_indices = check_token_ids("token_indices", self.token_indices)
        self.target_modules = name_selector("target_modules", self.target_modules)
        check_bool("init_weights", self.init_weights)
        if self.modules_to_save:
            raise ConfigError(
                f"modules_to_save={self.modules_to_save!r} is not a field of the trainable-tokens method (PEFT's has "
                "none either); to train whole modules beside token rows use LoraConfig(modules_to_save=..., "
                "trainable_token_indices=...)"
            )

    def summary(self) -> str:
        return f"trainable tokens: {len(self.token_indices)} embedding rows"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        del out["modules_to_save"]  # not a field of PEFT's config: its loader refuses unknown fields
        return out
