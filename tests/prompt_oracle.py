"""Shared by the prompt-learning tests: the same adapter built by real PEFT and by lorakit with identical weights,
and the references they are measured against (tests/test_prompt_tuning.py, test_p_tuning.py, test_prefix_tuning.py).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import peft
import torch
import transformers
from torch import nn

import lorakit
from conftest import MODEL_FACTORIES, input_ids

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def tiny_t5(seed: int = 0) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        initializer_factor=4.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


FACTORIES = {**MODEL_FACTORIES, "t5": tiny_t5}


def copy_prompt_weights(p: nn.Module, k: nn.Module) -> None:
    """Copy PEFT's prompt encoders and head copies into lorakit's (same parameter names below the prefixes)."""
    theirs = {n.split("prompt_encoder.", 1)[1]: t for n, t in p.named_parameters() if "prompt_encoder." in n}
    ours = dict(k.base_model.prompt_encoder.named_parameters())
    theirs.update({n.removeprefix("base_model."): t for n, t in p.named_parameters() if "modules_to_save" in n})
    ours.update({n.removeprefix("base_model.model."): t for n, t in k.named_parameters() if "modules_to_save" in n})
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))
    with torch.no_grad():
        for name, tensor in theirs.items():
            ours[name].copy_(tensor)


def build(method: str, arch: str, seed: int = 7, scale: float = 0.5, **fields: Any) -> tuple[nn.Module, nn.Module]:
    """``(peft_model, lorakit_model)``: the same base and a ``method`` config (a PEFT class name), the trainable
    weights perturbed (so a head copy differs from the base) and copied from PEFT into lorakit."""
    fields = {"task_type": TASK.get(arch, "SEQ_2_SEQ_LM"), "num_virtual_tokens": 4, **fields}
    p = peft.get_peft_model(FACTORIES[arch](), getattr(peft, method)(**copy.deepcopy(fields)))
    k = lorakit.get_peft_model(FACTORIES[arch](), getattr(lorakit, method)(**copy.deepcopy(fields)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in p.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))
    copy_prompt_weights(p, k)
    return p.eval(), k.eval()


def padded(batch: int = 2, seq: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and a left-padded attention mask (row 0 has 3 pads, row 1 one)."""
    ids = input_ids(batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    if batch > 1:
        mask[1, :1] = 0
    return ids, mask


def run(model: nn.Module, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(**kwargs)


def greedy_without_cache(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, prefix: bool
) -> torch.Tensor:
    """Greedy decoding by full forwards (no KV cache), positions as ``generate`` makes them from the mask (a prefix
    model moves them past its prefix itself; virtual tokens drop them)."""
    for _ in range(steps):
        extra = {}
        if prefix:
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = run(model, input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@contextlib.contextmanager
def peft_prefix_on_bert() -> Iterator[None]:
    """PEFT 0.21.2 looks for ``past_key_values`` in the forward signature; transformers 5.24 renamed it ``cache``,
    so PEFT refuses prefix tuning on BERT. Naming it in the signature lets PEFT's own code run (BERT's forward
    still accepts the old name and passes it on as ``cache``)."""
    fn = transformers.BertForSequenceClassification.forward
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    params.insert(-1, inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None))
    fn.__signature__ = sig.replace(parameters=params)
    try:
        yield
    finally:
        del fn.__signature__


def write_word_tokenizer(folder: str) -> None:
    """A local word-level tokenizer folder (``w0`` ... ``w94``), for the TEXT init; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def config_fields_match_peft(ours: type, theirs: type) -> None:
    """Every field of lorakit's config class is PEFT's with the same default; PEFT's others are informational."""
    import dataclasses

    def defaults(cls: type) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = value.value if hasattr(value, "value") else value
        return out

    mine, peft_fields = defaults(ours), defaults(theirs)
    assert set(mine) <= set(peft_fields), sorted(set(mine) - set(peft_fields))
    missing = set(peft_fields) - set(mine) - set(ours.INFORMATIONAL_FIELDS)
    assert not missing, sorted(missing)
    for name, value in mine.items():
        if name != "peft_type":  # PEFT fills it in __post_init__
            assert value == peft_fields[name], (name, value, peft_fields[name])
