"""The module every prompt-learning adapter trains: :class:`BasePromptEncoder`, which turns the adapter's virtual
token indices into its prompt.

Each method's encoder (``PromptEmbedding``, ``PromptEncoder``, ``PrefixEncoder``, PEFT's names and parameter
names) has an ``embedding`` with one row per virtual token and, for P-tuning and projected prefixes, layers that
compute the prompt from it. An adapter loaded for inference keeps only ``embedding``, holding the computed prompt
itself (what the file stores), as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn


class BasePromptEncoder(nn.Module):
    """An adapter's prompt: ``prompt()`` gives one row per virtual token, shape ``(1, rows, width)``."""

    embedding: nn.Embedding

    @property
    def reparameterized(self) -> bool:
        """Whether trainable layers compute the prompt from ``embedding`` (then a file, which holds only their
        output, cannot restore them). False for an adapter loaded for inference."""
        return False

    def virtual_tokens(self) -> torch.Tensor:
        """The indices of the virtual tokens, ``(rows,)``."""
        return torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)

    def prompt(self) -> torch.Tensor:
        """The prompt, ``(1, rows, width)``: the encoder's output for its virtual tokens, computed once per call
        (every row of a batch gets the same prompt)."""
        if not self.reparameterized:
            return self.embedding.weight.unsqueeze(0)
        return self(self.virtual_tokens().unsqueeze(0))

    def file_tensor(self) -> torch.Tensor:
        """What a file stores (PEFT's ``get_prompt_embedding_to_save``): the prompt, ``(rows, width)``."""
        return self.prompt()[0].detach()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """``(batch, rows)`` indices -> ``(batch, rows, width)``."""
        return self.embedding(indices)
