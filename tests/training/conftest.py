"""Fixtures for the training tests: a tiny byte-level BPE tokenizer with SmolLM2's chat template, built in-process.

No download: the tokenizer is trained in milliseconds on a few strings, so every text round-trips exactly
(byte-level), and the chat template is SmolLM2's (ChatML, with a default system message inserted when the
conversation has none).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_llama

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test bot.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Convert to YYYY-MM-DD: Friday, March 5, 2021 -> 2021-03-05",
    "the 5th of March, 2021; 5 March 2021; Mar. 5, 2021; 2021, March 5",
    "What is the capital of France? Paris. Say hello. hello world",
    "system user assistant You are a test bot.",
] * 4


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A ~300-token byte-level BPE tokenizer; eos and pad are ``<|im_end|>`` as in SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer without a chat template (the plain-text fallback)."""
    return make_tokenizer(chat_template=None)


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A random 2-layer Llama over the tiny tokenizer's vocabulary."""
    return tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@pytest.fixture
def model_dir(tmp_path, tiny_model, tokenizer):
    folder = tmp_path / "tiny-model"
    # initializer_range 0.02 gives a 32-wide model near-uniform logits that adapters inside the blocks can
    # barely move (the output head is frozen); a unit-scale head lets the tests see learning.
    with torch.no_grad():
        tiny_model.lm_head.weight.normal_(0.0, 1.0)
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_files(tmp_path):
    """16 training rows and 8 eval rows of the dates task (``training.runs.write_data``)."""
    from training.runs import write_data  # runs imports this module

    return write_data(tmp_path)
