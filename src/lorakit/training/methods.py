"""What each method trains with, from a run's settings: ``lorakit train --method lora | adalora | ia3``."""

from __future__ import annotations

from typing import Any

from lorakit.config import PeftConfig, TaskType
from lorakit.errors import ConfigError
from lorakit.training.config import DEFAULT_TARGETS, TrainConfig
from lorakit.tuners.adalora import AdaLoraConfig
from lorakit.tuners.ia3 import IA3Config
from lorakit.tuners.lora import LoraConfig


def adapter_config(cfg: TrainConfig, model: Any, total_steps: int) -> PeftConfig:
    """The adapter a run trains: LoRA/DoRA, AdaLoRA with its schedule laid over ``total_steps``, or IA³.

    Raises:
        ConfigError: AdaLoRA's warm-up and final phases leave no step to cut ranks in.
    """
    if cfg.method == "ia3":
        return ia3_config(cfg, getattr(getattr(model, "config", None), "model_type", None))
    common = dict(
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type=TaskType.CAUSAL_LM,
    )
    if cfg.method != "adalora":
        return LoraConfig(r=cfg.r, use_dora=cfg.use_dora, **common)
    tinit = cfg.tinit if cfg.tinit is not None else total_steps // 10
    tfinal = cfg.tfinal if cfg.tfinal is not None else total_steps // 5
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"AdaLoRA needs steps to cut ranks in: tinit {tinit} + tfinal {tfinal} >= {total_steps} steps in this "
            "run; lower --tinit/--tfinal or train longer"
        )
    return AdaLoraConfig(
        target_r=cfg.r,
        init_r=cfg.init_r if cfg.init_r is not None else max(cfg.r, round(1.5 * cfg.r)),
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_steps,
        orth_reg_weight=cfg.orth_reg_weight,
        **common,
    )


def ia3_config(cfg: TrainConfig, model_type: str | None) -> IA3Config:
    """IA³ on the architecture's default targets (keys, values, the MLP's down projection) unless ``--targets``
    was given; the feedforward modules are those of the targets that IA³ scales at the input."""
    if cfg.target_modules == list(DEFAULT_TARGETS):
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    feedforward = IA3Config.DEFAULT_FEEDFORWARD.get(model_type, [])
    targets = cfg.target_modules
    chosen = [t for t in targets if t in feedforward] if isinstance(targets, list) else feedforward
    return IA3Config(target_modules=targets, feedforward_modules=chosen, task_type=TaskType.CAUSAL_LM)
