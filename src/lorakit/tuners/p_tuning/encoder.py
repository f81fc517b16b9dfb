"""P-tuning's encoder: :class:`PromptEncoder`, trained embeddings h and the network f that turns them into the
prompt (Liu et al. 2021, arXiv 2103.10385, §3.2). PEFT's module and parameter names."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from lorakit.tuners.prompt_learning.encoder import BasePromptEncoder


class PromptEncoder(BasePromptEncoder):
    """h as ``embedding.weight`` ``(total_virtual_tokens, token_dim)`` and f as ``mlp_head`` (and ``lstm_head``).

    MLP: ``f(h) = W3 relu(W2 relu(W1 h))``, hidden width ``encoder_hidden_size``. LSTM: a bidirectional LSTM over
    the virtual tokens, then ``W2 relu(W1 ·)``. An adapter in inference mode has no f: ``embedding`` holds f(h).
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        width, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.total_virtual_tokens, width)
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=width,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, width))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP prompt encoder, which has "
                    "exactly 3 linear layers (as in PEFT); it sets the LSTM encoder's depth",
                    stacklevel=4,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, width),
            )

    @property
    def reparameterized(self) -> bool:
        return "mlp_head" in self._modules

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``(batch, rows)`` -> ``(batch, rows, token_dim)``: f applied to the embeddings of ``indices``."""
        embeds = self.embedding(indices)
        if not self.reparameterized:
            return embeds
        if "lstm_head" in self._modules:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)
