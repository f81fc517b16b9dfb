"""Every weight-based method under ``torch.compile``: one graph (no graph break in an adapter layer's forward),
the eager outputs, and gradients to the adapter. LoRA's compiled paths (hot-swapping, training, mixed batches) are
in tests/test_hotswap.py."""

from __future__ import annotations

import pytest
import torch

from conftest import Counting, input_ids, tiny_llama
from lorakit import BottleneckConfig, IA3Config, LoraConfig, get_peft_model

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

CONFIGS = {
    "lora": lambda: LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "dora": lambda: LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "houlsby": lambda: BottleneckConfig.houlsby(reduction_factor=4),
    "pfeiffer": lambda: BottleneckConfig.pfeiffer(reduction_factor=4),
}


def adapted(method: str):
    model = get_peft_model(tiny_llama(num_hidden_layers=1), CONFIGS[method]())
    with torch.no_grad():  # move every trainable tensor off its start, so the adapter changes the output
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("method", list(CONFIGS))
def test_inference_is_one_graph_with_eager_outputs(method):
    model = adapted(method).eval()
    with torch.no_grad():
        eager = model(input_ids=input_ids()).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids()).logits
        backend = Counting()
        compiled = torch.compile(model, backend=backend)
        got = compiled(input_ids=input_ids()).logits
    assert backend.graphs == 1
    assert not torch.allclose(eager, base)  # the adapter matters, so equal outputs mean something
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_forward_is_one_graph_and_reaches_the_adapter(method):
    model = adapted(method).train()
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    compiled(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert backend.graphs == 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
