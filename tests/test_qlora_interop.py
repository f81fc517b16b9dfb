"""QLoRA against the real Hugging Face PEFT + bitsandbytes, on CPU: the same 4-bit base in both libraries.

The base is quantized once with ``lorakit.quantize``, saved pre-quantized, and loaded by plain transformers
for each library, so both see bit-identical NF4 weights. PEFT wraps them in its own bnb LoRA layers.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import input_ids, tiny_llama
from test_peft_interop import assert_same_adapter_config, assert_same_adapter_files

peft = pytest.importorskip("peft", reason="interop tests need PEFT (the dev extra installs it)")
pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (CI installs it)")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture
def base_dir(tmp_path):
    lorakit.quantize(tiny_llama(initializer_range=0.2), bits=4).save_pretrained(tmp_path / "nf4")
    return tmp_path / "nf4"


def load_base(folder):
    from transformers import AutoModelForCausalLM

    from lorakit.layers.quantized import guard_cpu_repacking, is_bnb_layer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Both libraries compute from the same NF4 bytes in bitsandbytes' reference layout. On a CPU with
    # AVX512-BF16 an eval forward would repack them for bitsandbytes' CPU kernel (32-wide layers crash in it,
    # and PEFT 0.21 dequantizes the repacked bytes as if they were not: its DoRA norms come out wrong); that
    # layout has its own tests in test_kbit_packed.py.
    for module in model.modules():
        if is_bnb_layer(module, "Linear4bit"):
            guard_cpu_repacking(module, allow=False)
    return model


def run(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_qlora_adapter_loads_in_lorakit_and_back(base_dir, tmp_path, use_dora):
    ids = input_ids()
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    p = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(**settings))
    assert type(p.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    if use_dora:  # move the magnitudes off ‖W + s·BA‖, where DoRA's rescale is the identity
        with torch.no_grad():
            for name, param in p.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.5)
    expected = run(p, ids)
    p.save_pretrained(tmp_path / "peft")

    k = lorakit.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "peft")
    torch.testing.assert_close(run(k, ids), expected, rtol=1e-5, atol=1e-5)
    k.save_pretrained(tmp_path / "lorakit")
    assert_same_adapter_files(tmp_path / "peft", tmp_path / "lorakit")
    assert_same_adapter_config(tmp_path / "peft", tmp_path / "lorakit", skip=("base_model_name_or_path",))

    back = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "lorakit")
    torch.testing.assert_close(run(back, ids), expected, rtol=1e-5, atol=1e-5)


def test_same_training_step_on_the_4bit_base(base_dir):
    """One AdamW step from identical adapters: same loss, same updated factors (PEFT's bnb layers vs ours)."""
    ids = input_ids()
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    p = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(**settings))
    k = lorakit.get_peft_model(load_base(base_dir), lorakit.LoraConfig(**settings))
    missing, unexpected = k.load_state_dict({n: t for n, t in p.state_dict().items() if "lora_" in n}, strict=False)
    assert not unexpected and all("lora_" not in n for n in missing)
    losses = []
    for model in (p, k):
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    ps, ks = p.state_dict(), k.state_dict()
    for key in (key for key in ps if "lora_" in key):
        torch.testing.assert_close(ks[key], ps[key], rtol=1e-5, atol=1e-6)


def test_loftq_settings_are_read_and_written_in_peft_format(tmp_path):
    config = lorakit.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 2}
    )
    config.save_pretrained(tmp_path / "ours")
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert theirs.init_lora_weights == "loftq" and theirs.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}

    peft_config = peft.LoraConfig(
        r=4, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_iter=3)
    )
    peft_config.save_pretrained(tmp_path / "peft")
    ours = lorakit.LoraConfig.from_pretrained(tmp_path / "peft")
    assert ours.init_lora_weights == "loftq" and ours.loftq_config == {"loftq_bits": 4, "loftq_iter": 3}
