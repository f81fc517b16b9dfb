"""``lorakit train --dtype``: a bf16 base with fp32 adapters under autocast, the fused kernels' dtype rules, loss
scaling's state in checkpoints, and the refusals (fp16 on CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from lorakit.cli import main
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.layers import kind_for
from lorakit.training import precision as prec
from lorakit.training import trainer as trainer_mod
from lorakit.training.config import TrainConfig
from lorakit.training.trainer import train
from lorakit.tuners.lora import fused as fused_mod
from lorakit.tuners.lora.layer import LoraLayer
from training.runs import adapter, config


@pytest.fixture(autouse=True)
def _one_thread(one_thread_per_module):
    """Tiny models: one torch thread (see tests/conftest.py)."""


def _quiet(**kw):
    return dict(log=lambda s: None, progress=False, **kw)


def _run(model_dir, data_files, out, **kw):
    """A short run of the tiny model; returns (metrics, log lines)."""
    lines: list[str] = []
    kw = {"lora_dropout": 0.0, "save_every": 0, "max_steps": 2, **kw}
    result = train(config(model_dir, data_files, out, **kw), log=lines.append, progress=False)
    return result.metrics, lines


# -- whole runs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_run_is_near_fp32_trains_fp32_adapters_and_saves_fp32(tmp_path, model_dir, data_files, dora):
    """The first step's loss (before any update: precision alone differs) is within bf16's tolerance of fp32's;
    every trainable tensor is fp32 on a bf16 base; the adapter moved (gradients reached it); its file is fp32."""
    m32, _ = _run(model_dir, data_files, tmp_path / "fp32", use_dora=dora)
    seen = {}
    real_step = trainer_mod.Trainer._step

    def step(self, k, net):
        if k == 0:
            seen["base"] = {p.dtype for p in self.model.parameters() if not p.requires_grad}
            seen["trained"] = {p.dtype for p in self.model.parameters() if p.requires_grad}
        return real_step(self, k, net)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_mod.Trainer, "_step", step)
        m16, lines = _run(model_dir, data_files, tmp_path / "bf16", use_dora=dora, dtype="bf16")
    assert seen == {"base": {torch.bfloat16}, "trained": {torch.float32}}
    assert any("torch.autocast('cpu', torch.bfloat16)" in line for line in lines), lines
    first32, first16 = m32["history"][0]["loss"], m16["history"][0]["loss"]
    assert first16 == pytest.approx(first32, rel=2e-2), (first32, first16)
    assert all(h["loss"] == h["loss"] for h in m16["history"])  # finite (not NaN)
    saved = adapter(tmp_path / "bf16")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # as PEFT saves fp32 adapters
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in saved.items())  # B left zero: trained
    if dora:
        assert any(k.endswith("lora_magnitude_vector") for k in saved)
    assert m16["config"]["dtype"] == "bf16"


def test_bf16_resume_reaches_the_uninterrupted_result(tmp_path, model_dir, data_files):
    """A bf16 run resumed from its step-3 checkpoint ends bit-identical to the run that never stopped; a resume
    with another --dtype is refused (dtype is a resume setting)."""
    full = tmp_path / "full"
    train(config(model_dir, data_files, full, dtype="bf16"), **_quiet())
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    result = train(config(model_dir, data_files, resumed, dtype="bf16", resume="latest"), **_quiet())
    assert result.metrics["resumed_from_step"] == 3
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="dtype: checkpoint 'bf16', now 'fp32'"):
        train(config(model_dir, data_files, resumed, resume="latest"), **_quiet())


def test_loss_scaling_state_is_checkpointed_and_resumed(tmp_path, model_dir, data_files, monkeypatch):
    """The fp16 path's GradScaler (scale, unscale before clipping, step, update), run on the CPU with a CPU
    scaler under bf16: its state lands in trainer_state.json and a resume restores it, bit-identical."""
    scalers = []

    def cpu_scaler(self):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2))
        return scalers[-1]

    monkeypatch.setattr(prec.Precision, "grad_scaler", cpu_scaler)
    full = tmp_path / "full"
    train(config(model_dir, data_files, full, dtype="bf16"), **_quiet())
    doc = json.loads((full / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert doc["grad_scaler"]["scale"] == 2.0**11 and doc["grad_scaler"]["growth_interval"] == 2  # grew once
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    train(config(model_dir, data_files, resumed, dtype="bf16", resume="latest"), **_quiet())
    assert scalers[-1].get_scale() == scalers[0].get_scale() == 2.0**13  # 6 steps: grown at 2, 4 and 6
    a, b = adapter(full), adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    state = resumed / "checkpoints" / "step-00000003" / "trainer_state.json"
    doc["grad_scaler"]["scale"] = -1.0
    state.write_text(json.dumps(doc))
    with pytest.raises(AdapterFileError, match="trainer_state.json: 'grad_scaler.scale' is -1.0"):
        train(config(model_dir, data_files, resumed, dtype="bf16", resume=str(state.parent)), **_quiet())


def test_full_fine_tuning_in_bf16_keeps_fp32_weights(tmp_path, model_dir, data_files):
    """Method full trains every weight: they stay fp32 (the optimizer's weights), only the forward is autocast."""
    m, lines = _run(model_dir, data_files, tmp_path / "full", method="full", dtype="bf16", max_steps=1)
    assert any(line.startswith("precision: fp32 weights, forward under torch.autocast") for line in lines), lines
    assert m["history"][0]["loss"] > 0


# -- the fused kernels ------------------------------------------------------------------------------------------


def _layer(dtype: torch.dtype, adapter_dtype: torch.dtype, dora: bool = False) -> LoraLayer:
    torch.manual_seed(0)
    base = nn.Linear(32, 24).to(dtype).requires_grad_(False)
    layer = LoraLayer(base, kind_for(base))
    layer.add("default", 4, 8, dtype=adapter_dtype, use_dora=dora)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layer.set_active(["default"])
    return layer


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    for cls in (fused_mod.LoraLinearFunction, fused_mod.DoraLinearFunction):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _real=real: calls.append(1) or _real(*a))
    return calls


def _grads(layer: LoraLayer, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in layer.parameters() if p.requires_grad]
    return [g.float() for g in torch.autograd.grad(y.float().square().sum(), [x, *params])]


def _assert_near(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> None:
    """Relative error in norm: bf16's 8-bit mantissa (~4e-3 per rounding) accumulated over a few products."""
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("dora", [False, True])
def test_fused_kernel_steps_aside_under_autocast(fused_calls, dora):
    """A bf16 base with fp32 adapters under autocast: the plain path runs, in bf16 products, close to fp32."""
    layer, ref = _layer(torch.bfloat16, torch.float32, dora), _layer(torch.float32, torch.float32, dora)
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert not fused_calls and y.dtype == torch.bfloat16
    y_ref = ref(x)
    assert len(fused_calls) == 1  # the fp32 reference takes it
    _assert_near(y, y_ref)
    for got, want in zip(_grads(layer, x, y), _grads(ref, x, y_ref)):
        _assert_near(got, want)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_kernel_supports_all_bf16(fused_calls, dora):
    """Base and adapters all bf16, no autocast: the fused kernel runs in bf16 and matches the plain path."""
    layer = _layer(torch.bfloat16, torch.bfloat16, dora)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert len(fused_calls) == 1 and y.dtype == torch.bfloat16
    handle = layer.base_layer.register_forward_hook(lambda *a: None)  # a hook on the base: the plain path
    y_plain = layer(x)
    handle.remove()
    assert len(fused_calls) == 1
    _assert_near(y, y_plain)
    for got, want in zip(_grads(layer, x, y), _grads(layer, x, y_plain)):
        _assert_near(got, want)


# -- refusals -----------------------------------------------------------------------------------------------


def test_fp16_on_cpu_is_refused_with_the_reason(tmp_path, model_dir, data_files, capsys):
    with pytest.raises(ConfigError, match="fp16 is refused on the CPU"):
        TrainConfig(dtype="fp16", device="cpu")
    with pytest.raises(ConfigError, match="fp16 is refused on the CPU.*Use --dtype bf16"):
        prec.resolve("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="dtype 'bf32' is not one of .*did you mean"):
        TrainConfig(dtype="bf32")
    assert prec.resolve("bf16", torch.device("cpu")).grad_scaler() is None  # bf16 needs no loss scaling
    if torch.cuda.is_available():
        return
    out = tmp_path / "o"
    args = ["train", "--no-progress", "--model", str(model_dir), "--data", str(data_files[0]), "--output", str(out)]
    assert main([*args, "--dtype", "fp16"]) == 1  # --device auto: the CPU here
    assert "fp16 is refused on the CPU" in capsys.readouterr().err
    assert not (out / "adapter_config.json").exists()
