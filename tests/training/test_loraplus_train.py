"""``lorakit train --loraplus-ratio``: LoRA+ parameter groups (arXiv 2402.12354), a run that trains and resumes."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.training import trainer as trainer_mod
from lorakit.training.trainer import train
from training.runs import adapter, config


def test_loraplus_groups_train_and_resume(tmp_path, model_dir, data_files, monkeypatch):
    seen = []
    real = trainer_mod.build_optimizer

    def spy(name, params, lr, weight_decay):
        opt = real(name, params, lr, weight_decay)
        seen.append(opt)
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", spy)
    full = tmp_path / "full"
    train(config(model_dir, data_files, full, loraplus_ratio=8.0), log=lambda s: None, progress=False)
    groups = {g["name"]: g for g in seen[0].param_groups}
    assert [g["initial_lr"] for g in seen[0].param_groups] == pytest.approx([1e-2, 1e-6, 8e-2, 8e-2])
    assert len(groups["A"]["params"]) == len(groups["B"]["params"]) == 14  # 7 projections x 2 layers
    assert all(p.shape[0] == 4 for p in groups["A"]["params"]) and all(p.shape[1] == 4 for p in groups["B"]["params"])
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    cfg = config(model_dir, data_files, resumed, loraplus_ratio=8.0, resume="latest")
    assert train(cfg, log=lambda s: None, progress=False).metrics["resumed_from_step"] == 3
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="loraplus_ratio: checkpoint 8.0, now 4.0"):
        train(config(model_dir, data_files, resumed, loraplus_ratio=4.0, resume="latest"), log=lambda s: None)


@pytest.mark.parametrize("method", ["ia3", "full"])
def test_loraplus_is_refused_without_b_factors(tmp_path, method):
    with pytest.raises(ConfigError, match=f"--loraplus-ratio .* method '{method}'"):
        config(tmp_path, (tmp_path, tmp_path), tmp_path, method=method, loraplus_ratio=16.0)
