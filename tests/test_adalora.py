"""AdaLoRA: the schedule against the paper's formula, training against real PEFT step by step, truncation,
export to plain LoRA, files both ways, and the HF Trainer with no custom loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import input_ids, tiny_llama
from lorakit import AdaLoraConfig, LoraConfig, get_peft_model
from lorakit.errors import ConfigError
from lorakit.tuners.adalora.model import budget_schedule, rank_grid

peft = pytest.importorskip("peft", reason="AdaLoRA interop tests need PEFT (the dev extra installs it)")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=3, total_step=20, tinit=2, tfinal=4, lora_alpha=8)


def settings(**overrides):
    return {**SCHEDULE, "target_modules": TARGETS, "task_type": "CAUSAL_LM", **overrides}


def peft_pair(**overrides):
    """PEFT's and lorakit's AdaLoRA on identical tiny LLaMAs with identical (random) A, E, B."""
    cfg = settings(init_lora_weights=False, **overrides)
    p = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**cfg))
    k = get_peft_model(tiny_llama(), AdaLoraConfig(**cfg))
    state = {}
    for name, tensor in p.state_dict().items():
        factor = ".lora_A." in name or ".lora_B." in name
        state[name + ".weight" if factor else name] = tensor
    k.load_state_dict(state)
    return p, k


def run_steps(model, steps: int, explicit: bool, seed: int = 1):
    """PEFT's documented loop (explicit=True) or a plain loop with no AdaLoRA call at all."""
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        x = torch.randint(0, 96, (4, 12), generator=gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        if explicit:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def stripped(pattern):
    return {k.replace(".lora_E.default", ".lora_E"): v for k, v in pattern.items()}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the schedule --------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 2, 3, 5, 9, 12, 15, 16, 17, 20])
def test_budget_follows_the_cubic_schedule_and_peft(step):
    config = AdaLoraConfig(**settings())
    init, target = 6 * 6, 3 * 6
    budget, mask = budget_schedule(config, init, target, step)
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        expected = init
    elif step > end:
        expected = target
    else:  # paper eq. 11
        expected = int(target + (init - target) * (1 - (step - config.tinit) / (end - config.tinit)) ** 3)
    assert budget == expected
    p = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**settings()))
    assert (budget, mask) == p.base_model.rankallocator.budget_schedule(step)


# -- against PEFT -------------------------------------------------------------------------------------


def test_outputs_loss_and_penalty_equal_peft():
    p, k = peft_pair()
    assert k.get_nb_trainable_parameters() == p.get_nb_trainable_parameters()
    ids = input_ids()
    torch.testing.assert_close(logits(k, ids), logits(p, ids), rtol=1e-5, atol=1e-5)
    p.train(), k.train()
    loss_p, loss_k = p(input_ids=ids, labels=ids).loss, k(input_ids=ids, labels=ids).loss
    assert loss_k.item() == pytest.approx(loss_p.item(), rel=1e-5)
    plain = k.get_base_model()(input_ids=ids, labels=ids).loss  # the penalty is what makes the difference
    penalty = k.base_model.orthogonal_penalty()
    assert loss_k.item() == pytest.approx(plain.item() + 0.5 * penalty.item(), rel=1e-6)


def test_closed_form_of_the_update_and_of_the_penalty():
    _, k = peft_pair()
    layer = k.base_model.model.model.layers[0].self_attn.q_proj
    a, b, e = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_E["default"]
    s = 8 / (6 + 1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), s * b @ (a * e))
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + s * (x @ (a * e).t() @ b.t()))
    terms = []
    for lay in (m for m in k.modules() if isinstance(m, lorakit.LoraLayer)):
        a, b = lay.lora_A["default"].weight, lay.lora_B["default"].weight
        terms += [torch.linalg.norm(a @ a.t() - torch.eye(6)), torch.linalg.norm(b.t() @ b - torch.eye(6))]
    torch.testing.assert_close(k.base_model.orthogonal_penalty(), torch.stack(terms).mean())


def test_training_equals_peft_step_by_step_and_keeps_the_target_budget():
    p, k = peft_pair()
    losses_p = run_steps(p, 20, explicit=True)
    losses_k = run_steps(k, 20, explicit=True)
    assert losses_k == pytest.approx(losses_p, rel=1e-4)
    pattern_p = stripped(p.peft_config["default"].rank_pattern)
    pattern_k = k.peft_config["default"].rank_pattern
    assert pattern_k == pattern_p
    assert sum(sum(v) for v in pattern_k.values()) == 3 * 6  # target_r × adapted matrices
    ps, ks = p.state_dict(), k.state_dict()
    for name, tensor in ps.items():
        if ".lora_" in name:
            mine = ks[name + ".weight"] if (".lora_A." in name or ".lora_B." in name) else ks[name]
            torch.testing.assert_close(mine, tensor, rtol=1e-3, atol=1e-5)


def test_no_call_at_all_gives_the_same_run_as_peft_s_loop():
    """The plain loop (no update_and_allocate) through the optimizer hook = the explicit PEFT loop."""
    _, explicit = peft_pair()
    _, automatic = peft_pair()
    assert run_steps(automatic, 20, explicit=False) == run_steps(explicit, 20, explicit=True)
    assert automatic.peft_config["default"].rank_pattern == explicit.peft_config["default"].rank_pattern
    assert automatic.base_model.budget_history == explicit.base_model.budget_history
    # another model's optimizer does not move this model's schedule
    other = nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    before = list(automatic.base_model.budget_history)
    automatic.train()
    opt.step()
    assert automatic.base_model.budget_history == before


def test_files_equal_peft_both_ways_and_shrink_to_the_kept_ranks(tmp_path):
    p, k = peft_pair()
    run_steps(p, 20, explicit=True)
    run_steps(k, 20, explicit=True)
    p.save_pretrained(tmp_path / "peft")
    k.save_pretrained(tmp_path / "ours")
    pw, kw = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
    )
    assert set(kw) == set(pw)
    for key in pw:
        torch.testing.assert_close(kw[key], pw[key], rtol=1e-3, atol=1e-5)
    kept = sum(sum(v) for v in k.peft_config["default"].rank_pattern.values())
    a_rows = sum(t.shape[0] for key, t in kw.items() if key.endswith("lora_A"))
    assert a_rows == kept == 18  # 6 modules × init_r 6 = 36 triplets in memory, 18 in the file
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == k.peft_config["default"].rank_pattern
    assert (tmp_path / "ours" / "adalora_ranks.png").stat().st_size > 1000
    from lorakit.cli.inspect import summarize

    info = summarize(tmp_path / "ours")  # lorakit inspect
    assert {k: info["config"][k] for k in ("init_r", "target_r", "total_step")} == {
        "init_r": 6,
        "target_r": 3,
        "total_step": 20,
    }
    assert "18 of 36 triplets kept" in info["summary"]
    assert sum(m["rank"] for m in info["modules"].values()) == 18 and info["modules_adapted"] == 6
    assert info["adapter_parameters"] == sum(t.numel() for t in kw.values())

    ids = input_ids()
    expected = logits(k, ids)
    ours_from_peft = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours_from_peft, ids), logits(p, ids), rtol=1e-5, atol=1e-5)
    peft_from_ours = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(peft_from_ours, ids), expected, rtol=1e-5, atol=1e-5)
    reloaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    layer = reloaded.base_model.model.model.layers[1].mlp.down_proj
    assert layer.r["default"] == sum(k.peft_config["default"].rank_pattern["model.layers.1.mlp.down_proj.lora_E"])
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    reloaded.save_pretrained(tmp_path / "again")  # save -> load -> save is byte-stable
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes()


def test_truncate_keeps_the_outputs_and_export_lora_loads_in_lorakit_and_peft(tmp_path):
    _, k = peft_pair()
    run_steps(k, 20, explicit=False)
    ids = input_ids()
    expected = logits(k, ids)
    ranks = k.base_model.truncate()
    assert sum(ranks.values()) == 18
    layer = k.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == layer.r["default"] == ranks["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-5, atol=1e-5)

    config = k.export_lora(tmp_path / "lora")
    assert config.peft_type.value == "LORA" and json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"]
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-4, atol=1e-4)
    merged = ours.merge_and_unload()  # a plain LoRA adapter, mergeable as any
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


def test_layers_that_matter_keep_the_rank():
    """A synthetic task where one of two layers barely reaches the output: the budget goes to the other."""

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.useful = nn.Linear(16, 16)
            self.muted = nn.Linear(16, 16)

        def forward(self, x):
            return self.useful(x) + 1e-3 * self.muted(x)

    torch.manual_seed(0)
    teacher = torch.randn(16, 4) @ torch.randn(4, 16) * 0.5  # a rank-4 change the useful layer must learn
    model = get_peft_model(
        TwoPaths(),
        AdaLoraConfig(target_modules=["useful", "muted"], init_r=8, target_r=4, total_step=60, tinit=5, tfinal=10),
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    base = TwoPaths()
    base.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    )
    model.train()
    for _ in range(60):
        x = torch.randn(32, 16)
        with torch.no_grad():
            target = base(x) + x @ teacher.t()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    ranks = model.base_model.kept_ranks()
    assert ranks["useful"] + ranks["muted"] == 8  # target_r × 2 matrices
    assert ranks["useful"] >= 6 and ranks["useful"] > ranks["muted"], ranks


def test_orthogonality_penalty_falls_during_training():
    _, k = peft_pair()
    _, unregularised = peft_pair(orth_reg_weight=0.0)
    before = k.base_model.orthogonal_penalty().item()
    run_steps(k, 20, explicit=False)
    run_steps(unregularised, 20, explicit=False)
    after = k.base_model.orthogonal_penalty().item()
    assert after < 0.8 * before
    assert after < 0.8 * unregularised.base_model.orthogonal_penalty().item()


def test_merge_round_trip_and_merged_logits():
    _, k = peft_pair()
    run_steps(k, 20, explicit=False)
    ids = input_ids()
    expected = logits(k, ids)
    weight = k.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    k.merge_adapter()
    torch.testing.assert_close(logits(k, ids), expected, rtol=1e-5, atol=1e-5)
    k.unmerge_adapter()
    torch.testing.assert_close(k.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_hf_trainer_runs_the_schedule_with_no_custom_loop(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), AdaLoraConfig(**settings(total_step=12, tinit=2, tfinal=2)))
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 96, (12,), generator=gen)} for _ in range(24)]
    data = [{**r, "labels": r["input_ids"]} for r in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(v) for v in pattern.values()) == 3 * 6
    assert [s for s, _ in model.base_model.budget_history][-1] == 10  # total_step − tfinal
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adalora_ranks.png").exists()


# -- configuration and refusals ------------------------------------------------------------------------


def test_config_is_validated_with_clear_errors():
    with pytest.raises(ConfigError, match=r"tinit \+ tfinal = 10 \+ 10 >= total_step = 20"):
        AdaLoraConfig(total_step=20, tinit=10, tfinal=10)
    with pytest.raises(ConfigError, match="total_step=None is invalid"):
        AdaLoraConfig()
    with pytest.raises(ConfigError, match="beta1=1.0 is invalid"):
        AdaLoraConfig(total_step=10, beta1=1.0)
    with pytest.raises(ConfigError, match="target_r=16 > init_r=12"):
        AdaLoraConfig(total_step=10, target_r=16)
    with pytest.raises(ConfigError, match="DoRA"):
        AdaLoraConfig(total_step=10, use_dora=True)
    with pytest.raises(ConfigError, match=r"rank_pattern\['x.lora_E'\] is invalid"):
        AdaLoraConfig(total_step=10, rank_pattern={"x.lora_E": [1, 0]})
    with pytest.raises(ConfigError, match="this adapter is 'LORA'; AdaLoraConfig reads 'ADALORA'"):
        AdaLoraConfig.from_dict(LoraConfig().to_dict())
    assert type(LoraConfig.from_dict(AdaLoraConfig(total_step=10).to_dict())) is AdaLoraConfig


def test_one_method_and_one_trainable_adapter_per_model():
    model = get_peft_model(tiny_llama(), AdaLoraConfig(**settings()))
    with pytest.raises(ConfigError, match="holds AdaLoRA adapters"):
        model.add_adapter("lora", LoraConfig(target_modules=TARGETS))
    with pytest.raises(ConfigError, match="already the trainable AdaLoRA adapter"):
        model.add_adapter("second", AdaLoraConfig(**settings()))
    model.add_adapter("frozen", AdaLoraConfig(**settings(), inference_mode=True))
    assert "frozen" in model.peft_config and model.base_model.trainable_adapter_name == "default"
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        lora.add_adapter("ada", AdaLoraConfig(**settings()))
    with pytest.raises(lorakit.UnsupportedModuleError, match="AdaLoRA adapts linear layers"):
        get_peft_model(tiny_llama(), AdaLoraConfig(**settings(target_modules=["embed_tokens"])))


def test_rank_grid_lays_modules_out_by_layer():
    grid, rows, cols = rank_grid({"model.layers.0.q_proj": 3, "model.layers.1.q_proj": 1, "model.layers.1.v_proj": 2})
    assert rows == ["0", "1"] and cols == ["q_proj", "v_proj"]
    assert grid[0][0] == 3 and math.isnan(grid[0][1]) and grid[1] == [1.0, 2.0]


def test_adalora_on_a_4bit_base_equals_adalora_on_the_dequantized_weights():
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CI installs it)")
    from test_kbit import dequantized_copy

    cfg = AdaLoraConfig(**settings(init_lora_weights=False))
    q = get_peft_model(lorakit.quantize(tiny_llama(initializer_range=0.2)), cfg)
    plain = dequantized_copy(q)
    ids = input_ids()
    torch.testing.assert_close(logits(q, ids), logits(plain, ids), rtol=1e-4, atol=1e-4)
    run_steps(q, 20, explicit=False)
    assert sum(sum(v) for v in q.peft_config["default"].rank_pattern.values()) == 3 * 6
