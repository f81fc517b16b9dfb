"""A run whose loss or weights become NaN/Inf stops with an error and saves nothing from the bad step.

The last good checkpoint stays, no checkpoint holds non-finite weights, and the adapter already in
``--output`` (if any) is left as it was; ``lorakit train`` exits non-zero with one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.training import trainer as trainer_mod
from lorakit.training.checkpoint import list_checkpoints
from lorakit.training.trainer import TrainingDivergedError, train
from training.runs import cli_args, config, write_data, write_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("divergence")
    return write_model(root / "model"), write_data(root / "data")


def _nan_loss_from_step(monkeypatch, bad_step: int) -> None:
    """The loss of optimizer step ``bad_step`` (1-based) and later is NaN (one micro-batch per step)."""
    real, calls = trainer_mod.Trainer._loss_sum, []

    def loss_sum(self, net, batch):
        calls.append(1)
        loss = real(self, net, batch)
        return loss * float("nan") if len(calls) >= bad_step else loss

    monkeypatch.setattr(trainer_mod.Trainer, "_loss_sum", loss_sum)


def _poison_weight_after_step(monkeypatch, bad_step: int) -> None:
    """After optimizer step ``bad_step`` one trained weight holds Inf while the loss reported is still finite."""
    real = trainer_mod.Trainer._step

    def step(self, index, net):
        result = real(self, index, net)
        if index + 1 == bad_step:
            weight = next(p for p in self.model.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step)


def _all_finite(folder) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(folder / "adapter_model.safetensors").values())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_loss_from_step(monkeypatch, 5)
    with pytest.raises(TrainingDivergedError, match="diverged at step 5 of 6: the loss is nan") as err:
        train(config(*inputs, out), log=lambda s: None, progress=False)
    assert isinstance(err.value, LorakitError)
    assert "step-00000003" in str(err.value)  # where to look: the last good checkpoint
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert _all_finite(out / "checkpoints" / "step-00000003")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "metrics.json").exists()


def test_a_diverged_run_leaves_the_previous_adapter_in_place(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(*inputs, out), log=lambda s: None, progress=False)
    before = {name: (out / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}
    metrics = (out / "metrics.json").read_bytes()
    _nan_loss_from_step(monkeypatch, 2)
    with pytest.raises(TrainingDivergedError):
        train(config(*inputs, out, overwrite=True), log=lambda s: None, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "metrics.json").read_bytes() == metrics


def test_non_finite_weights_are_never_checkpointed(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_weight_after_step(monkeypatch, 3)  # the step a checkpoint is due
    with pytest.raises(TrainingDivergedError, match="diverged at step 3 of 6: the trained weight .* NaN or Inf"):
        train(config(*inputs, out), log=lambda s: None, progress=False)
    assert list_checkpoints(out) == [] and not (out / "adapter_model.safetensors").exists()


def test_non_finite_weights_are_never_written_as_the_result(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_weight_after_step(monkeypatch, 6)  # the last step: only the final adapter is due
    with pytest.raises(TrainingDivergedError, match="step 6 of 6"):
        train(config(*inputs, out), log=lambda s: None, progress=False)
    assert not (out / "adapter_model.safetensors").exists()
    assert [s for s, _ in list_checkpoints(out)] == [3]


def test_a_huge_learning_rate_exits_nonzero_with_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(*inputs, out, learning_rate=1e30)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the model-loading progress bar
    assert last.startswith("lorakit train: error: training diverged at step ") and "--lr" in last, last
    assert not (out / "adapter_model.safetensors").exists()
    for _, folder in list_checkpoints(out):
        assert _all_finite(folder)


def test_resume_refuses_a_checkpoint_with_non_finite_weights(inputs, tmp_path):
    out = tmp_path / "run"
    train(config(*inputs, out, max_steps=3, save_every=2), log=lambda s: None, progress=False)
    folder = out / "checkpoints" / "step-00000002"
    tensors = load_file(folder / "adapter_model.safetensors")
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match="non-finite adapter weights"):
        train(config(*inputs, out, max_steps=3, save_every=2, resume="latest"), log=lambda s: None, progress=False)
    assert json.loads((out / "metrics.json").read_text())["total_steps"] == 3  # the finished run's files stay
