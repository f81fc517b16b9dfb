"""The training loop end to end on a tiny local model: files, exact resume, Ctrl-C, refusals, YAML + flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit import PeftModel
from lorakit.cli import main
from lorakit.cli.train import parse_targets
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.training import trainer as trainer_mod
from lorakit.training.checkpoint import list_checkpoints
from lorakit.training.config import TrainConfig
from lorakit.training.trainer import train
from training.runs import ROWS


def config(model_dir, data_files, out, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=str(data_files[0]),
        eval_data=str(data_files[1]),
        output=str(out),
        r=4,
        lora_alpha=8,
        batch_size=2,
        max_steps=6,
        learning_rate=1e-2,
        save_every=3,
        max_new_tokens=8,
        eval_batch_size=4,
        samples=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_train_writes_adapter_metrics_plot_and_checkpoints(tmp_path, model_dir, data_files, tiny_model):
    out = tmp_path / "run"
    lines: list[str] = []
    result = train(config(model_dir, data_files, out), log=lines.append, progress=False)
    assert not result.interrupted and result.steps == 6
    blas = [line for line in lines if line.startswith("CPU BLAS: ")]  # what MKL runs is said, not guessed
    assert len(blas) == 1 and "MKL branch in force: " in blas[0], lines
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, 7))
    assert metrics["eval_before"]["total"] == metrics["eval_after"]["total"] == 8
    assert metrics["data"]["used"] == 16 and metrics["global_batch"] == 2
    assert [s for s, _ in list_checkpoints(out)] == [3]  # the final step is the adapter itself
    # the adapter is a normal PEFT-format adapter that loads onto the base model
    loaded = PeftModel.from_pretrained(tiny_model, out)
    trained = adapter(out)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    assert len(list(loaded.base_model.lora_layers())) == 2 * 7  # q,k,v,o,gate,up,down in 2 layers


def test_loss_falls(tmp_path, model_dir, data_files):
    cfg = config(
        model_dir,
        data_files,
        tmp_path / "run",
        max_steps=40,
        skip_eval=True,
        save_every=0,
        learning_rate=5e-2,
        scheduler="constant",
    )
    history = train(cfg, log=lambda s: None, progress=False).metrics["history"]
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_dora_run_trains_and_writes_a_dora_adapter(tmp_path, model_dir, data_files, tiny_model):
    out = tmp_path / "dora"
    cfg = config(model_dir, data_files, out, use_dora=True, skip_eval=True, save_every=0, max_steps=20)
    history = train(cfg, log=lambda s: None, progress=False).metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    trained = adapter(out)
    magnitudes = [k for k in trained if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 2 * 7
    loaded = PeftModel.from_pretrained(tiny_model, out)
    assert loaded.peft_config["default"].use_dora
    with pytest.raises(ConfigError, match="use_dora applies to method 'lora'"):
        config(model_dir, data_files, out, use_dora=True, method="full")


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_qlora_run_trains_a_plain_lora_adapter(tmp_path, model_dir, data_files, tiny_model, optim):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CI installs it)")
    out = tmp_path / "qlora"
    cfg = config(model_dir, data_files, out, bits=4, optim=optim, skip_eval=True, save_every=0, max_steps=20)
    result = train(cfg, log=lambda s: None, progress=False)
    history = result.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert not any(k.endswith("lora_magnitude_vector") for k in adapter(out))
    loaded = PeftModel.from_pretrained(tiny_model, out)  # the adapter loads on the full-precision base
    assert loaded.peft_config["default"].r == 4


def test_loftq_run_starts_nearer_the_full_precision_model(tmp_path, model_dir, data_files, tiny_model):
    """--qlora --loftq: the adapter it writes (after a step with a negligible learning rate: the LoftQ start)
    on the 4-bit base of ``lorakit merge --bits 4`` is closer to the fp32 model than that base alone."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (CI installs it)")
    from transformers import AutoModelForCausalLM

    from lorakit import quantize

    out = tmp_path / "loftq"
    cfg = config(model_dir, data_files, out, bits=4, loftq=True, r=16, skip_eval=True, save_every=0, max_steps=1)
    cfg.learning_rate = 1e-12
    logged = []
    train(cfg, log=logged.append, progress=False)
    assert any(line.startswith("LoftQ start: ‖W − Q‖") for line in logged), logged
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41]])
    q = quantize(AutoModelForCausalLM.from_pretrained(model_dir), bits=4).eval()
    with torch.no_grad():
        full, plain = tiny_model.eval()(ids).logits, q(ids).logits
        started = PeftModel.from_pretrained(q, out).eval()(ids).logits
    assert (started - full).norm() < 0.5 * (plain - full).norm()  # 0.28 measured at r=16 (B = 0 gives 1.0)


def test_adalora_run_cuts_ranks_to_the_target_and_writes_the_heatmap(tmp_path, model_dir, data_files, tiny_model):
    out = tmp_path / "adalora"
    cfg = config(
        model_dir, data_files, out, method="adalora", r=2, init_r=4, skip_eval=True, save_every=0, max_steps=10
    )
    logged = []
    train(cfg, log=logged.append, progress=False)
    assert any("AdaLoRA init_r=4 -> average r=2 (cut between steps 1 and 8 of 10)" in line for line in logged), logged
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 10
    kept = {name: sum(mask) for name, mask in saved["rank_pattern"].items()}
    assert sum(kept.values()) == 2 * len(kept) == 2 * 7 * 2  # r × (7 projections × 2 layers)
    rows = sum(t.shape[0] for key, t in adapter(out).items() if key.endswith("lora_A"))
    assert rows == sum(kept.values())  # the file holds the kept triplets only
    assert (out / "adalora_ranks.png").is_file()
    loaded = PeftModel.from_pretrained(tiny_model, out)
    assert loaded.peft_type.value == "ADALORA"
    with pytest.raises(ConfigError, match="init_r, tinit and tfinal are AdaLoRA settings"):
        TrainConfig(init_r=12)
    with pytest.raises(ConfigError, match="init_r=4 < r=8"):
        TrainConfig(method="adalora", init_r=4)


def test_quantization_and_optimizer_settings_are_checked():
    with pytest.raises(ConfigError, match="loftq initialises adapters for the 4-bit NF4 base"):
        TrainConfig(loftq=True)
    with pytest.raises(ConfigError, match="loftq initialises adapters for the 4-bit NF4 base"):
        TrainConfig(loftq=True, bits=4, quant_type="fp4")
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        TrainConfig(bits=3)
    with pytest.raises(ConfigError, match="optim 'adam8bit' is not one of"):
        TrainConfig(optim="adam8bit")
    with pytest.raises(ConfigError, match="method 'full' cannot use it"):
        TrainConfig(bits=4, method="full")


def test_resume_reaches_the_uninterrupted_result(tmp_path, model_dir, data_files):
    """A run resumed from its step-3 checkpoint ends bit-identical to the run that never stopped (with dropout)."""
    full = tmp_path / "full"
    train(config(model_dir, data_files, full, lora_dropout=0.2, skip_eval=True), log=lambda s: None, progress=False)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    cfg = config(model_dir, data_files, resumed, lora_dropout=0.2, skip_eval=True, resume="latest")
    result = train(cfg, log=lambda s: None, progress=False)
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert result.metrics["resumed_from_step"] == 3
    assert [h["step"] for h in result.metrics["history"]] == list(range(1, 7))


def test_resume_refuses_changed_settings(tmp_path, model_dir, data_files):
    out = tmp_path / "run"
    train(config(model_dir, data_files, out, skip_eval=True), log=lambda s: None, progress=False)
    with pytest.raises(ConfigError, match="learning_rate: checkpoint 0.01, now 0.02"):
        train(config(model_dir, data_files, out, skip_eval=True, resume="latest", learning_rate=2e-2), log=print)


def test_ctrl_c_writes_a_checkpoint_then_resume_finishes(tmp_path, model_dir, data_files, monkeypatch):
    out = tmp_path / "run"
    real_step = trainer_mod.Trainer._step

    def step_then_ctrl_c(self, step, net):
        result = real_step(self, step, net)
        if step == 1:  # a real SIGINT, delivered to the handler the trainer installed
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step_then_ctrl_c)
    cfg = config(model_dir, data_files, out, skip_eval=True, save_every=0)
    result = train(cfg, log=lambda s: None, progress=False)
    assert result.interrupted and result.steps == 2
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert not (out / "adapter_config.json").exists()  # no final adapter from an unfinished run
    monkeypatch.setattr(trainer_mod.Trainer, "_step", real_step)

    resumed = train(config(model_dir, data_files, out, skip_eval=True, save_every=0, resume="latest"), log=print)
    assert resumed.steps == 6 and (out / "adapter_model.safetensors").is_file()
    straight = tmp_path / "straight"
    train(config(model_dir, data_files, straight, skip_eval=True, save_every=0), log=lambda s: None, progress=False)
    for key, value in adapter(straight).items():
        assert torch.equal(value, adapter(out)[key]), key


def test_existing_adapter_is_not_overwritten_without_flag(tmp_path, model_dir, data_files):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"keep": "me"}')
    with pytest.raises(AdapterFileError, match="already holds an adapter.*--overwrite"):
        train(config(model_dir, data_files, out), log=print)
    assert (out / "adapter_config.json").read_text() == '{"keep": "me"}'


def test_unwritable_output_fails_before_loading(tmp_path, model_dir, data_files):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(AdapterFileError, match="not writable|is a file"):
        train(config(model_dir, data_files, blocker / "out"), log=print)


def test_cli_exit_codes_and_messages(tmp_path, model_dir, data_files, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data_files[0]), "--output", str(out)]
    args += ["--max-steps", "2", "--batch-size", "2", "--skip-eval", "--no-progress", "--r", "2"]
    assert main(args) == 0
    assert main(args) == 1  # the adapter exists now
    assert "already holds an adapter" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["train", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 1
    assert "neither a local folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--scheduler", "bogus"])
    assert exc.value.code == 2


def test_yaml_config_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("r: 16\nalpha: 32\nlr: 0.0005\ntargets: all-linear\nbatch-size: 4\n")
    cfg = TrainConfig.from_sources(yaml_file, {"learning_rate": 1e-4})
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.batch_size) == (16, 32, "all-linear", 4)
    assert cfg.learning_rate == 1e-4  # the flag wins over the file
    yaml_file.write_text("rank: 4\n")
    with pytest.raises(ConfigError, match="unknown setting 'rank'"):
        TrainConfig.from_sources(yaml_file)
    with pytest.raises(ConfigError, match="scheduler 'cosin' is not one of.*did you mean 'cosine'"):
        TrainConfig(scheduler="cosin")
    with pytest.raises(ConfigError, match="r must be > 0"):
        TrainConfig(r=0)


def test_parse_targets():
    assert parse_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert parse_targets(["q_proj,v_proj"]) == ["q_proj", "v_proj"]
    assert parse_targets(["all-linear"]) == "all-linear"
    assert parse_targets([r".*\.(q|v)_proj"]) == r".*\.(q|v)_proj"


def test_torchrun_two_processes_give_the_one_process_adapter(tmp_path, model_dir, data_files):
    """DDP (gloo, 2 CPU processes, batch 2 each) == one process with batch 4: the same global batch."""
    common = ["--model", str(model_dir), "--data", str(data_files[0]), "--max-steps", "3", "--skip-eval"]
    common += ["--no-progress", "--rank", "4", "--lr", "1e-2", "--save-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "lorakit", "train", *common, "--batch-size", "4", "--output", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two += ["-m", "lorakit", "train", *common, "--batch-size", "2", "--output", str(tmp_path / "two")]
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"], m1["global_batch"], m2["global_batch"]) == (1, 2, 4, 4)
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
    assert [s for s, _ in list_checkpoints(tmp_path / "two")] == [2]  # rank 0 wrote it, once


def test_loss_on_supervised_positions_only_equals_full_logits_loss(tiny_model, tokenizer):
    """The output head run on supervised positions alone gives the loss (and gradients) of the full logits."""
    from lorakit.training.data import build_dataset, collate

    examples, _ = build_dataset(ROWS[:4], tokenizer, max_length=64)
    batch = collate(examples, tokenizer.pad_token_id)
    results = []
    for sliced in (True, False):
        tiny_model.zero_grad()
        trainer = trainer_mod.Trainer.__new__(trainer_mod.Trainer)
        trainer.slice_logits = sliced
        loss = trainer._loss_sum(tiny_model, batch)
        loss.backward()
        results.append((loss.detach(), tiny_model.lm_head.weight.grad.clone()))
    assert trainer_mod._supports_logit_mask(tiny_model)
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets < batch["attention_mask"].sum()  # the prompt positions were skipped


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b'{"prompt": "a"}\n', "completion"),
        (b'{"prompt": "caf\xe9", "completion": "x"}\n', "UTF-8"),
        (b'{"prompt": "a", "completion": "b"}\n{not json\n', "line 2"),
    ],
)
def test_cli_bad_data_exits_nonzero_with_the_reason(tmp_path, model_dir, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(bad), "--output", str(out), "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and message in err, err
    assert not (out / "adapter_config.json").exists()


def test_too_long_examples_are_truncated_or_dropped_and_counted(tmp_path, model_dir, data_files):
    from transformers import AutoTokenizer

    from lorakit.training.data import build_dataset

    examples, _ = build_dataset(data_files[0], AutoTokenizer.from_pretrained(model_dir), max_length=None)
    lengths = [len(ex["input_ids"]) for ex in examples]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the rows are longer
    longer = sum(n > limit for n in lengths)
    assert 0 < longer < 16
    cfg = config(model_dir, data_files, tmp_path / "t", max_length=limit, max_steps=1, skip_eval=True)
    report = train(cfg, log=lambda s: None, progress=False).metrics["data"]
    assert (report["truncated"], report["used"], report["max_length"]) == (longer, 16, limit)
    cfg = config(model_dir, data_files, tmp_path / "d", max_length=limit, overflow="drop", max_steps=1, skip_eval=True)
    report = train(cfg, log=lambda s: None, progress=False).metrics["data"]
    assert (report["dropped_total"], report["used"], report["truncated"]) == (longer, 16 - longer, 0)


def test_torchrun_refusal_stops_every_process(tmp_path, model_dir, data_files):
    """An output rank 0 refuses (it holds an adapter) ends all processes with exit 1; none hangs at a barrier."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit"]
    cmd += ["train", "--model", str(model_dir), "--data", str(data_files[0]), "--output", str(out), "--skip-eval"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "already holds an adapter" in done.stderr
    assert (out / "adapter_config.json").read_text() == "{}"


def test_ia3_run_trains_vectors_and_saves_a_peft_ia3_adapter(tmp_path, model_dir, data_files, tiny_model):
    """--method ia3: the IA³ defaults of the architecture (keys, values, down_proj as feedforward), vectors that
    move from their start at one, a file PEFT's IA³ reads, and --targets choosing other modules."""
    out = tmp_path / "ia3"
    cfg = config(model_dir, data_files, out, method="ia3", skip_eval=True, save_every=0, max_steps=4, learning_rate=0.1)
    logged = []
    result = train(cfg, log=logged.append, progress=False)
    assert any(line.startswith("IA³ (learned vectors): 192 trainable") for line in logged), logged
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" and saved["feedforward_modules"] == ["down_proj"]
    assert sorted(saved["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    vectors = adapter(out)
    assert all(key.endswith("ia3_l") for key in vectors) and len(vectors) == 3 * 2
    assert any(not torch.equal(v, torch.ones_like(v)) for v in vectors.values())  # trained away from one
    assert result.metrics["history"][-1]["loss"] < result.metrics["history"][0]["loss"]
    loaded = PeftModel.from_pretrained(tiny_model, out)
    assert loaded.peft_type.value == "IA3"

    other = tmp_path / "ia3-targets"
    cfg = config(model_dir, data_files, other, method="ia3", target_modules=["q_proj", "up_proj", "down_proj"],
                 skip_eval=True, save_every=0, max_steps=1)  # fmt: skip
    train(cfg, log=lambda _: None, progress=False)
    saved = json.loads((other / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "up_proj"]
    assert saved["feedforward_modules"] == ["down_proj"]
