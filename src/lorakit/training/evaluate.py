"""Exact-match evaluation by greedy generation.

The model answers each eval prompt greedily; an answer is correct when it equals the expected answer after
stripping surrounding whitespace, and nothing else (no case folding, no punctuation removal), so a model that
answers ``"The date is 2021-03-05."`` instead of ``"2021-03-05"`` is wrong. Beside that strict figure,
:class:`EvalResult` reports a lenient one, ``contains``: the share of outputs in which the expected answer
appears anywhere. The gap between the two tells whether a model fails on the format or on the content.

An answer that was still going when it reached ``max_new_tokens`` (no end-of-turn token) is wrong even if the
text so far matches: a model that writes ``"2021-03-05\n\nThis is..."`` must not pass because the budget
happened to end after the date. So the measured accuracy does not depend on the budget, as long as the budget
leaves room for the answer and its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.training.data import end_of_turn_ids, render_prompt


@dataclass
class EvalResult:
    """Exact-match accuracy over ``total`` prompts, with every prompt's output in ``samples``.

    Each sample is ``{"prompt", "expected", "output", "correct", "contains", "stopped"}``; ``prompt`` is the text
    of the last prompt message (the user's request); ``stopped`` is False when the output was cut off by
    ``max_new_tokens`` (such an output is never ``correct``).
    """

    accuracy: float
    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)
    contains: float = 0.0  #: share of outputs holding the expected answer anywhere (lenient)
    contains_correct: int = 0  #: how many outputs hold the expected answer anywhere

    def summary(self) -> str:
        """One line: ``"exact match 12/200 = 6.0% (answer anywhere in output: 31.5%)"``."""
        return (
            f"exact match {self.correct}/{self.total} = {self.accuracy:.1%} "
            f"(answer anywhere in output: {self.contains:.1%})"
        )


def normalize_answer(text: str) -> str:
    """The answer as compared: surrounding whitespace stripped, nothing else (exact match stays strict)."""
    return text.strip()


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts_messages: Sequence[Sequence[dict]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to chat prompts, decoded from the new tokens only.

    Prompts are rendered with the chat template's generation prompt and left-padded in batches of
    ``batch_size``; generation stops at the tokenizer's eos or end-of-turn token. Works with any model that
    has a transformers-style ``generate`` (a ``PreTrainedModel``, lorakit's ``PeftModel``). The model is put
    in eval mode and restored to its previous mode afterwards; the tokenizer's padding side (and, if it had
    none, pad token) is restored too.

    Returns:
        One string per prompt, without special tokens, in input order.
    """
    return [text for text, _ in _generate(model, tokenizer, prompts_messages, max_new_tokens, batch_size)]


def _generate(
    model: Any, tokenizer: Any, prompts_messages: Sequence[Sequence[dict]], max_new_tokens: int, batch_size: int
) -> list[tuple[str, bool]]:
    """:func:`generate_batch`, with whether each output ended with a stop token (False: cut by the budget)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    stops = end_of_turn_ids(tokenizer)
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = bool(getattr(model, "training", False))
    tokenizer.padding_side = "left"  # generation continues from the last position, so pads go first
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs: list[tuple[str, bool]] = []
    try:
        model.eval()
        device = _device(model)
        with _grad_free(model):
            for start in range(0, len(prompts_messages), batch_size):
                texts = [render_prompt(tokenizer, m) for m in prompts_messages[start : start + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    input_ids=enc["input_ids"],  # (B, T), left-padded
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops or None,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
                outputs += [_decode(tokenizer, row.tolist(), stops) for row in new]
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        if was_training:
            model.train()
    return outputs


def _grad_free(model: Any) -> Any:
    """``torch.inference_mode()``, or ``torch.no_grad()`` for a model sharded by FSDP (DTensor parameters): FSDP2
    keeps the storage of the parameters it all-gathers, and a tensor made in inference mode can never again be
    saved for backward, so the next training step would fail."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            return torch.no_grad()
    return torch.inference_mode()


def _decode(tokenizer: Any, ids: list[int], stops: list[int]) -> tuple[str, bool]:
    # Cut at the first stop token ourselves: what follows is padding, whatever the pad id is.
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    return tokenizer.decode(ids[:cut], skip_special_tokens=True), cut is not None


def exact_match(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[dict], str]],
    max_new_tokens: int = 16,
    batch_size: int = 32,
    limit: int | None = None,
    generate: Callable[[list[list[dict]]], list[str]] | None = None,
) -> EvalResult:
    """Greedy exact-match accuracy on ``(prompt messages, expected answer)`` pairs (see :func:`eval_pairs`).

    Args:
        max_new_tokens: the answer budget; keep it a little above the longest expected answer, since a
            correct answer also has to stop.
        limit: evaluate only the first ``limit`` pairs.
        generate: replaces :func:`generate_batch` (prompts -> outputs, all taken as finished); for tests and
            custom decoding.
    """
    pairs = list(pairs)[:limit] if limit is not None else list(pairs)
    prompts = [list(p) for p, _ in pairs]
    if generate is None:
        outputs = _generate(model, tokenizer, prompts, max_new_tokens, batch_size) if pairs else []
    else:
        outputs = [(text, True) for text in generate(prompts)]
    if len(outputs) != len(pairs):
        raise RuntimeError(f"generation returned {len(outputs)} outputs for {len(pairs)} prompts")
    samples = []
    for (prompt, expected), (output, stopped) in zip(pairs, outputs):
        want = normalize_answer(expected)
        samples.append(
            {
                "prompt": prompt[-1]["content"] if prompt else "",
                "expected": expected,
                "output": output,
                "correct": stopped and normalize_answer(output) == want,
                "contains": want in output,
                "stopped": stopped,
            }
        )
    total = len(samples)
    correct = sum(s["correct"] for s in samples)
    contains = sum(s["contains"] for s in samples)
    return EvalResult(
        accuracy=correct / total if total else 0.0,
        correct=correct,
        total=total,
        samples=samples,
        contains=contains / total if total else 0.0,
        contains_correct=contains,
    )
