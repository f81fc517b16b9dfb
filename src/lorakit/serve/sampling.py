"""Each row's next token: greedy (temperature 0), or sampled with its own temperature, top-p and generator.

A sampled row draws from its own ``torch.Generator``, seeded from the request's ``seed`` (and the choice's index),
so what a seeded request gets does not depend on what else shares its batch. Greedy is ``argmax`` of the
logits, as ``generate(do_sample=False)``; the first of equal maxima wins in both. Top-p (nucleus) sampling as in
Holtzman et al. 2019 (arXiv 1904.09751): the smallest set of tokens whose probability reaches ``top_p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """How one row picks its tokens. ``temperature == 0`` means greedy (``top_p`` and the generator unused)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (any int: reduced to 64 bits)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 63))
    return generator


def next_tokens(logits: torch.Tensor, rows: Sequence[Sampling]) -> list[int]:
    """The next token of each row.

    Args:
        logits: ``(b, vocab)``, the last position's logits of each row.
        rows: ``b`` sampling settings, in row order.
    """
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} sampling settings")
    chosen = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not row.greedy:
            chosen[i] = _sample(logits[i].float(), row)
    return chosen


def _sample(logits: torch.Tensor, row: Sampling) -> int:
    """One token from ``softmax(logits / T)`` cut to its top-p nucleus. ``logits``: ``(vocab,)``."""
    probs = torch.softmax(logits / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # the mass of the tokens ranked above each one
        sorted_probs[before >= row.top_p] = 0.0  # the first token always stays (its mass before is 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))
