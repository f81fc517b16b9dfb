"""Shared fixtures: tiny random models built from real transformers configs (no downloads)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_llama(
    seed: int = 0, tie: bool = False, initializer_range: float = 0.02, vocab_size: int = 96, **config: Any
) -> LlamaForCausalLM:
    """A random 2-layer, 32-wide LLaMA; ``config`` overrides any other ``LlamaConfig`` field."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        initializer_range=initializer_range,
    )
    cfg = LlamaConfig(**{**fields, **config})
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def input_ids(batch: int = 2, seq: int = 10, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@pytest.fixture
def ids() -> torch.Tensor:
    return input_ids()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spinning costs a lot:
    modules that run many of them ask for this (one torch thread while the module runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Counting:
    """A ``torch.compile`` backend that counts the graphs it is asked to compile, then runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and global counters emptied before and after the test."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # global across tests; reset() leaves it
    yield
    torch._dynamo.reset()
