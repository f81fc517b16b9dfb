"""SIGTERM (what schedulers and ``docker stop`` send) stops ``lorakit train`` like Ctrl-C: a checkpoint at the next
step boundary, the same message, and ``--resume`` continues to the uninterrupted result.
"""

from __future__ import annotations

import os
import signal

import pytest

from lorakit.training import trainer as trainer_mod
from lorakit.training.checkpoint import list_checkpoints
from lorakit.training.trainer import train
from training.runs import (
    assert_same_adapter,
    cli_args,
    config,
    run_lorakit,
    start_training,
    write_data,
    write_model,
)

STEPS = 40  # long enough that the signal always lands before the end (a step takes milliseconds)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    return write_model(root / "model"), write_data(root / "data")


def test_sigterm_checkpoints_and_resume_reaches_the_uninterrupted_result(inputs, tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    args = cli_args(*inputs, out, max_steps=STEPS, save_every=0)
    proc = start_training(args)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    saved = [s for s, _ in list_checkpoints(out)]
    assert len(saved) == 1 and 1 <= saved[0] < STEPS, rest
    assert f"interrupted at step {saved[0]}/{STEPS}; checkpoint saved in" in rest
    assert "continue with the same command plus --resume" in rest
    assert not (out / "adapter_model.safetensors").exists()

    resumed = run_lorakit([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{saved[0]:08d}'} at step {saved[0]}" in resumed.stdout
    done = run_lorakit(cli_args(*inputs, straight, max_steps=STEPS, save_every=0))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Loading weights" not in done.stderr + done.stdout  # --no-progress: transformers' bar is off too
    assert_same_adapter(straight, out)


def test_a_second_sigterm_stops_at_once(inputs, tmp_path, monkeypatch):
    """In-process: the first SIGTERM asks for a checkpoint; a second one, before the step ends, interrupts."""
    real_step = trainer_mod.Trainer._step

    def step_with_two_signals(self, step, net):
        result = real_step(self, step, net)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step_with_two_signals)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(config(*inputs, tmp_path / "run", save_every=0), log=lambda s: None, progress=False)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert list_checkpoints(tmp_path / "run") == []


def test_sigterm_in_process_returns_an_interrupted_result(inputs, tmp_path, monkeypatch):
    real_step = trainer_mod.Trainer._step

    def step_then_sigterm(self, step, net):
        result = real_step(self, step, net)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step_then_sigterm)
    result = train(config(*inputs, tmp_path / "run", save_every=0), log=lambda s: None, progress=False)
    assert result.interrupted and result.steps == 3 and result.stop_signal == signal.SIGTERM
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
