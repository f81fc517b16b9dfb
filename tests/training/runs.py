"""Helpers for tests that run ``lorakit train`` end to end on the tiny model: data, model folder, settings, CLI.

Module-scoped fixtures build these once per test file (a tiny run takes about a second), so the helpers take
plain folders instead of pytest's function-scoped ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from lorakit.training.config import TrainConfig
from training.conftest import make_tokenizer

ROWS = [{"prompt": f"Convert to YYYY-MM-DD: March {d}, 2021", "completion": f"2021-03-{d:02d}"} for d in range(1, 25)]


def write_data(folder: Path) -> tuple[Path, Path]:
    """16 training rows and 8 eval rows of the dates task, as JSONL files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:16]))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[16:]))
    return train_file, eval_file


def write_model(folder: Path) -> Path:
    """The tiny random Llama of ``tests/training/conftest.py``'s ``model_dir`` fixture, saved to ``folder``."""
    tokenizer = make_tokenizer()
    model = tiny_llama(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def settings(model_dir: Path, data: tuple[Path, Path], out: Path, **kw) -> dict:
    """A 6-step run (checkpoint at step 3) with dropout, so a resume must restore the RNGs to match."""
    base = dict(
        model=str(model_dir),
        data=str(data[0]),
        eval_data=str(data[1]),
        output=str(out),
        r=4,
        lora_alpha=8,
        lora_dropout=0.2,
        batch_size=2,
        max_steps=6,
        learning_rate=1e-2,
        save_every=3,
        keep_checkpoints=10,
        skip_eval=True,
    )
    base.update(kw)
    return base


def config(model_dir: Path, data: tuple[Path, Path], out: Path, **kw) -> TrainConfig:
    return TrainConfig(**settings(model_dir, data, out, **kw))


def cli_args(model_dir: Path, data: tuple[Path, Path], out: Path, **kw) -> list[str]:
    """``lorakit train`` flags for :func:`settings` (booleans as bare flags; ``None`` values left out)."""
    flags = {"r": "--rank", "lora_alpha": "--alpha", "lora_dropout": "--dropout", "learning_rate": "--lr"}
    args = ["train", "--no-progress"]
    for key, value in settings(model_dir, data, out, **kw).items():
        flag = flags.get(key, "--" + key.replace("_", "-"))
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def lorakit_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


def subprocess_env() -> dict[str, str]:
    """One thread (the results then match across processes) and unbuffered output (lines arrive as printed)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_lorakit(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(lorakit_cmd(args), env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


def start_training(args: list[str]) -> subprocess.Popen:
    """``lorakit train`` in a child process, returned once it has entered the training loop (its log says so)."""
    proc = subprocess.Popen(
        lorakit_cmd(args), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("training steps"):
            return proc
    proc.wait(timeout=60)
    raise AssertionError("lorakit train ended before training:\n" + "".join(seen))
