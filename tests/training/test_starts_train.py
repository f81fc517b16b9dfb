"""``lorakit train --init``: PiSSA/OLoRA runs save a plain LoRA adapter that works on the original base model.

The trained model (residual base + adapter) is the reference: the adapter file the run writes, loaded by lorakit
and by PEFT onto the untouched base, must give its logits; checkpoints keep the unconverted adapter; the
"before" evaluation sees the base model; a resumed run ends where the uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.training import trainer as trainer_mod
from lorakit.training.trainer import Trainer, train
from training.runs import assert_same_adapter, cli_args, config

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]
IDS = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_rewriting_start_saves_plain_lora_for_the_base(tmp_path, model_dir, data_files, init, monkeypatch):
    seen = []
    real = trainer_mod.exact_match

    def spy(model, *args, **kwargs):  # what each evaluation runs: "before", then "after"
        seen.append(logits(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "exact_match", spy)
    out = tmp_path / "out"
    run = Trainer(config(model_dir, data_files, out, init_lora_weights=init, skip_eval=False, eval_limit=2))
    run.run()
    trained = logits(run.model)
    torch.testing.assert_close(seen[0], logits(base(model_dir)), rtol=1e-5, atol=1e-5)  # before: the base model
    torch.testing.assert_close(seen[1], trained)
    file_config = json.loads((out / "adapter_config.json").read_text())
    assert (file_config["r"], file_config["lora_alpha"], file_config["init_lora_weights"]) == (8, 16, True)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base(model_dir), out)), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits(peft.PeftModel.from_pretrained(base(model_dir), out)), trained, rtol=1e-5, atol=1e-5
    )
    # a checkpoint keeps the adapter as trained; lorakit and PEFT load it by running the start on the base again
    step = out / "checkpoints" / "step-00000003"
    ckpt_config = json.loads((step / "adapter_config.json").read_text())
    assert (ckpt_config["r"], ckpt_config["init_lora_weights"]) == (4, init)
    ours, theirs = (
        PeftModel.from_pretrained(base(model_dir), step),
        peft.PeftModel.from_pretrained(base(model_dir), step),
    )
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_a_resumed_pissa_run_ends_where_the_whole_run_does(tmp_path, model_dir, data_files, monkeypatch):
    whole = tmp_path / "whole"
    train(config(model_dir, data_files, whole, init_lora_weights="pissa_niter_2"), log=lambda s: None, progress=False)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    seen = []
    real = trainer_mod.exact_match

    def spy(model, *args, **kwargs):
        seen.append(logits(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "exact_match", spy)
    cfg = config(model_dir, data_files, resumed, init_lora_weights="pissa_niter_2", resume="latest")
    cfg.skip_eval, cfg.eval_limit = False, 1
    assert train(cfg, log=lambda s: None, progress=False).metrics["resumed_from_step"] == 3
    assert_same_adapter(whole, resumed)
    torch.testing.assert_close(seen[0], logits(base(model_dir)), rtol=1e-5, atol=1e-5)  # before: still the base
    with pytest.raises(ConfigError, match="init_lora_weights: checkpoint 'pissa_niter_2', now 'olora'"):
        train(config(model_dir, data_files, resumed, init_lora_weights="olora", resume="latest"), log=lambda s: None)


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_data_driven_starts_read_the_training_data(tmp_path, model_dir, data_files, init):
    out = tmp_path / init
    run = Trainer(config(model_dir, data_files, out, init_lora_weights=init, max_steps=2))
    run.run()
    trained = logits(run.model)
    file_config = json.loads((out / "adapter_config.json").read_text())
    if init == "corda":  # trained on the residual: saved converted, plain LoRA of rank 2r for the base
        assert (file_config["r"], file_config["init_lora_weights"]) == (8, True)
    else:  # B = 0 on the untouched base: saved as it is (EVA's ranks in rank_pattern), loads without data
        assert file_config["init_lora_weights"] == "eva" and file_config["eva_config"]["rho"] == 2.0
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base(model_dir), out)), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits(peft.PeftModel.from_pretrained(base(model_dir), out)), trained, rtol=1e-5, atol=1e-5
    )


def test_the_cli_flag_trains_an_orthogonal_start(tmp_path, model_dir, data_files):
    out = tmp_path / "orth"
    assert main(cli_args(model_dir, data_files, out, init_lora_weights="orthogonal", max_steps=2)) == 0
    file_config = json.loads((out / "adapter_config.json").read_text())
    assert (file_config["r"], file_config["init_lora_weights"]) == (4, "orthogonal")  # no residual: saved as is
    args = ["train", "--init", "gaussian", "--model", str(model_dir), "--data", str(data_files[0]), "-o", str(out)]
    assert main([*args, "--max-steps", "1", "--skip-eval", "--no-progress", "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(init_lora_weights="pisa"), r"init 'pisa' is not one of .*did you mean 'pissa'"),
        (dict(init_lora_weights="pissa_niter_0"), r"init 'pissa_niter_0' is not one of"),
        (dict(init_lora_weights="pissa", bits=4), r"--init pissa trains on the residual .* quantized"),
        (dict(init_lora_weights="olora", method="adalora"), r"--init olora starts LoRA adapters; method 'adalora'"),
        (dict(init_lora_weights="orthogonal", r=3), r"--init orthogonal needs an even --r .* got 3"),
        (dict(init_lora_weights="olora", bits=4, loftq=True), r"--loftq is a start of its own"),
    ],
)
def test_starts_the_run_cannot_honour_are_refused(tmp_path, settings, match):
    with pytest.raises(ConfigError, match=match):
        config(tmp_path, (tmp_path, tmp_path), tmp_path, **settings)
