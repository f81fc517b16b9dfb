"""Prefix tuning's encoder: :class:`PrefixEncoder`, the prefix P of every layer's keys and values, trained
directly or through an MLP (Li & Liang 2021, arXiv 2101.00190, §4.3). PEFT's module and parameter names."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.tuners.prefix_tuning.config import PrefixTuningConfig
from lorakit.tuners.prompt_learning.encoder import BasePromptEncoder


class PrefixEncoder(BasePromptEncoder):
    """P, ``(num_virtual_tokens, num_layers * 2 * token_dim)``: ``embedding.weight`` itself, or with
    ``prefix_projection`` ``transform(embedding.weight)`` where ``transform = Linear, tanh, Linear``.

    An adapter in inference mode has no ``transform``: ``embedding`` holds P.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            with torch.no_grad():
                for param in last.parameters():
                    param.zero_()

    @property
    def reparameterized(self) -> bool:
        return "transform" in self._modules

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``(batch, rows)`` -> ``(batch, rows, num_layers * 2 * token_dim)``."""
        embeds = self.embedding(indices)
        return self.transform(embeds) if self.reparameterized else embeds
