"""Prompt tuning's encoder: :class:`PromptEmbedding`, the learned prompt P itself (Lester et al. 2021, arXiv
2104.08691, §2), and its three starting points (§3.2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.tuners.prompt_learning.encoder import BasePromptEncoder
from lorakit.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(BasePromptEncoder):
    """P, ``(total_virtual_tokens, token_dim)``, as ``embedding.weight`` (PEFT's parameter name).

    Args:
        config: the adapter's config (sizes filled in).
        word_embeddings: the model's input embeddings, read by the ``SAMPLE_VOCAB`` and ``TEXT`` inits.

    Raises:
        ConfigError: ``TEXT`` init with a tokenizer that cannot be loaded from this machine, or a text with no token.
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        rows = config.total_virtual_tokens
        self.embedding = nn.Embedding(rows, config.token_dim)  # RANDOM: torch's N(0, 1)
        if config.inference_mode:  # a file's prompt is loaded into it
            return
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (rows,), dtype=torch.long)
        elif config.prompt_tuning_init == PromptTuningInit.TEXT:
            ids = torch.tensor(_text_token_ids(config, rows), dtype=torch.long)
        else:
            return
        with torch.no_grad():
            start = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
        self.embedding.weight = nn.Parameter(start.to(torch.float32))


def _text_token_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """The tokens of ``prompt_tuning_init_text``, repeated or cut to ``rows`` (PEFT's rule)."""
    kwargs = dict(config.tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", False):
        raise ConfigError(
            "tokenizer_kwargs asks for trust_remote_code=True; lorakit never runs code from a tokenizer folder. "
            "Use a tokenizer that transformers can load without it"
        )
    from transformers import AutoTokenizer  # only this init needs a tokenizer

    kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError... depending on what is missing
        raise ConfigError(
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} cannot be loaded from this machine "
            f"({type(exc).__name__}: {exc}); lorakit never downloads: give the path of a local tokenizer folder"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no token; give a non-empty text"
        )
    return (ids * math.ceil(rows / len(ids)))[:rows]
