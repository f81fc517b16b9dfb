"""What the prompt-learning methods' configs share: :class:`PromptLearningConfig` (PEFT's), the sizes of a prompt
and how they are read from the base model's config (as PEFT's ``_prepare_prompt_learning_config`` fills them).

Prompt tuning, P-tuning and prefix tuning train no weight of the model: they learn ``num_virtual_tokens`` extra
positions, given to the model as embeddings prepended to the input (prompt tuning, P-tuning) or as key/value
pairs prepended in every attention layer (prefix tuning). A file holds the learned prompt as one tensor,
``prompt_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.config import PeftConfig, TaskType, check_positive_int, is_int
from lorakit.errors import ConfigError, ShapeMismatchError

#: The file key of the learned prompt (PEFT's).
PROMPT_KEY = "prompt_embeddings"


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


@dataclass
class PromptLearningConfig(PeftConfig):
    """The fields every prompt-learning method has (PEFT's ``PromptLearningConfig``).

    The sizes after ``num_virtual_tokens`` describe the base model; left None, they are read from its config when
    the adapter is added (and written to the file), as PEFT does.
    """

    num_virtual_tokens: int | None = None
    """How many virtual tokens the prompt has (the paper's prompt length), e.g. 20. Required."""
    token_dim: int | None = None
    """Width of one virtual token: the model's hidden size (for prefix tuning on grouped-query attention, the
    width of one layer's keys: ``head_dim * num_key_value_heads``). None: read from the model's config."""
    num_transformer_submodules: int | None = None
    """1 for decoder-only and encoder-only models, 2 for encoder-decoder ones (a prompt per stack). None: 2 when
    ``task_type`` is ``SEQ_2_SEQ_LM``, else 1."""
    num_attention_heads: int | None = None
    """Attention heads of the model (for prefix tuning on grouped-query attention, its key/value heads). None:
    read from the model's config."""
    num_layers: int | None = None
    """Transformer layers of the model. None: read from the model's config."""

    #: The file's one tensor, ``prompt_embeddings``, belongs to no module (``lorakit inspect``).
    FILE_PREFIX: ClassVar[str] = "prompt_"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ConfigError(
                f"{type(self).__name__} needs num_virtual_tokens, the length of the learned prompt: a positive "
                "integer such as 20"
            )
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _optional_positive_int(name, getattr(self, name))
        submodules = self.num_transformer_submodules
        if submodules is not None and (not is_int(submodules) or submodules not in (1, 2)):
            raise ConfigError(
                f"num_transformer_submodules={submodules!r} is invalid; accepted: 1 (decoder-only or encoder-only "
                "models), 2 (encoder-decoder models) or null (picked from task_type)"
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt: ``num_virtual_tokens`` per transformer stack."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    # -- sizes from the model ------------------------------------------------------------------------------

    def fill_from_model(self, model_config: Any) -> None:
        """Fill the size fields left None from the base model's config, in place (PEFT's rules and order).

        Raises:
            ConfigError: a size the model's config does not give; it names the field to set.
        """
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
        data = data.get("text_config") or data  # a vision-language model: its language model's sizes
        if self.num_layers is None:
            self.num_layers = getattr(model_config, "num_hidden_layers", None) or _first(
                data, "num_layers", ("num_hidden_layers", "num_layers", "n_layer")
            )
        if self.token_dim is None:
            self.token_dim = _first(data, "token_dim", ("hidden_size", "n_embd", "d_model"))
        if self.num_attention_heads is None:
            self.num_attention_heads = _first(
                data, "num_attention_heads", ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
            )

    # -- the file ------------------------------------------------------------------------------------------

    def prompt_shape(self) -> tuple[int, int] | None:
        """The shape of the file's ``prompt_embeddings``: one row per virtual token of width ``token_dim``
        (None while a size is unknown)."""
        if self.token_dim is None:
            return None
        return (self.total_virtual_tokens, self.token_dim)

    def check_file(self, state: dict[str, Any]) -> None:
        """Refuse a ``prompt_embeddings`` tensor whose shape contradicts this config, before anything is built.

        Raises:
            ShapeMismatchError: naming both shapes.
        """
        tensor = state.get(PROMPT_KEY)
        expected = self.prompt_shape()
        if tensor is not None and expected is not None and tuple(tensor.shape) != expected:
            raise ShapeMismatchError(
                f"the adapter file's {PROMPT_KEY!r} has shape {tuple(tensor.shape)} but its config describes "
                f"{expected} ({self.summary_of_sizes()}); the file and its adapter_config.json do not belong together"
            )

    def summary_of_sizes(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, num_transformer_submodules="
            f"{self.num_transformer_submodules}, token_dim={self.token_dim}"
        )


def _first(data: dict[str, Any], field_name: str, keys: tuple[str, ...]) -> int:
    for key in keys:
        if data.get(key) is not None:
            return data[key]
    raise ConfigError(
        f"{field_name} is None and the model's config has none of {list(keys)}; set {field_name} in the config"
    )
