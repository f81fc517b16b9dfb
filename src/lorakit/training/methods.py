"""What each ``lorakit train --method`` trains: one :class:`TrainMethod` per name, in :data:`TRAIN_METHODS`.

A method's entry says how a run's settings become its adapter config, how the run describes it in the log, and
what the run cannot do with it (resume, a quantized base); the trainer asks the entry and names no method.
``full`` (every weight trains, the baseline adapters are compared against) is the one name without an adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.config import PeftConfig, TaskType
from lorakit.errors import ConfigError
from lorakit.training.starts import lora_init, start_fields
from lorakit.tuners.adalora import AdaLoraConfig
from lorakit.tuners.bottleneck import BottleneckConfig
from lorakit.tuners.ia3 import IA3Config
from lorakit.tuners.lora import LoraConfig
from lorakit.tuners.p_tuning import PromptEncoderConfig
from lorakit.tuners.prefix_tuning import PrefixTuningConfig
from lorakit.tuners.prompt_tuning import PromptTuningConfig, PromptTuningInit

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

#: ``--method`` without an adapter: every base weight trains.
FULL = "full"


@dataclass(frozen=True)
class TrainMethod:
    """One ``--method``: its title, how its config is built and described, and what it cannot do."""

    name: str
    title: str  #: in the log, the loss plot and the report, e.g. "AdaLoRA"
    build: Callable[[TrainConfig, Any, int], PeftConfig]  #: (settings, model, total steps) -> adapter config
    describe: Callable[[TrainConfig, PeftConfig], str]  #: one line for the log, e.g. "LoRA r=8 alpha=16"
    help: str  #: for ``--method``'s help
    no_resume: str | None = None  #: why ``--resume`` is refused, or None
    no_fsdp: str | None = None  #: why ``--fsdp`` is refused, or None
    uses_rank: bool = False  #: ``--r``/``--alpha`` mean something to it (shown in titles)


def _common(cfg: TrainConfig) -> dict[str, Any]:
    return dict(
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type=TaskType.CAUSAL_LM,
    )


def lora_config(cfg: TrainConfig, model: Any, total_steps: int) -> LoraConfig:
    """LoRA (or DoRA with ``use_dora``) at rank ``r`` on ``target_modules``."""
    init = lora_init(cfg.init_lora_weights)
    return LoraConfig(
        r=cfg.r,
        use_dora=cfg.use_dora,
        lora_bias=cfg.lora_bias,
        init_lora_weights=init,
        **start_fields(cfg.init_lora_weights),
        trainable_token_indices=cfg.trainable_token_indices,
        target_parameters=cfg.target_parameters,
        **_common(cfg),
    )


def adalora_config(cfg: TrainConfig, model: Any, total_steps: int) -> AdaLoraConfig:
    """AdaLoRA ending at average rank ``r``, its warm-up and final phases laid over ``total_steps``.

    Raises:
        ConfigError: the warm-up and final phases leave no step to cut ranks in.
    """
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
        **_common(cfg),
    )


def ia3_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> IA3Config:
    """IA³ on the architecture's default targets (keys, values, the MLP's down projection) unless ``--targets``
    was given; the feedforward modules are those of the targets that IA³ scales at the input."""
    from lorakit.training.config import DEFAULT_TARGETS

    if cfg.target_modules == list(DEFAULT_TARGETS):
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    feedforward = IA3Config.DEFAULT_FEEDFORWARD.get(model_type, [])
    targets = cfg.target_modules
    chosen = [t for t in targets if t in feedforward] if isinstance(targets, list) else feedforward
    return IA3Config(target_modules=targets, feedforward_modules=chosen, task_type=TaskType.CAUSAL_LM)


def _no_targets(cfg: TrainConfig, method: str, where: str) -> None:
    from lorakit.training.config import DEFAULT_TARGETS

    if cfg.target_modules != list(DEFAULT_TARGETS):
        raise ConfigError(f"--targets does not apply to --method {method}: {where}; drop --targets")


def _fixed_sites(cfg: TrainConfig, method: str) -> None:
    _no_targets(cfg, method, "bottleneck adapters sit after blocks' outputs, at places known per architecture")


def prompt_tuning_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021, arXiv 2104.08691): ``num_virtual_tokens`` trained input embeddings,
    started from ``prompt_init_text``'s token embeddings, else from sampled vocabulary embeddings (§3.2: both
    beat a random start)."""
    _no_targets(cfg, "prompt-tuning", "the adapter is virtual tokens before the input, not a module change")
    text = cfg.prompt_init_text
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.SAMPLE_VOCAB,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=getattr(model, "name_or_path", None) if text else None,
    )


def p_tuning_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> PromptEncoderConfig:
    """P-tuning (Liu et al. 2021, arXiv 2103.10385): virtual tokens computed by an MLP prompt encoder."""
    _no_targets(cfg, "p-tuning", "the adapter is virtual tokens before the input, not a module change")
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


def prefix_tuning_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021, arXiv 2101.00190): trained keys and values before every layer's own."""
    _no_targets(cfg, "prefix-tuning", "the adapter is keys and values prepended in every attention layer")
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)


def houlsby_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> BottleneckConfig:
    """Houlsby et al. 2019 (arXiv 1902.00751): a bottleneck adapter after the attention and the feed-forward
    outputs of every block, bottleneck = hidden / ``reduction_factor``."""
    _fixed_sites(cfg, "houlsby")
    return BottleneckConfig.houlsby(reduction_factor=cfg.reduction_factor, task_type=TaskType.CAUSAL_LM)


def pfeiffer_config(cfg: TrainConfig, model: Any, total_steps: int = 0) -> BottleneckConfig:
    """Pfeiffer et al. 2020 (arXiv 2005.00247): one bottleneck adapter after each block's feed-forward output."""
    _fixed_sites(cfg, "pfeiffer")
    return BottleneckConfig.pfeiffer(reduction_factor=cfg.reduction_factor, task_type=TaskType.CAUSAL_LM)


def _describe_prompt_tuning(cfg: TrainConfig, config: PeftConfig) -> str:
    start = f"from the text {cfg.prompt_init_text!r}" if cfg.prompt_init_text else "from sampled vocabulary"
    return f"prompt tuning, {cfg.num_virtual_tokens} virtual tokens ({start})"


def _describe_lora(cfg: TrainConfig, config: PeftConfig) -> str:
    start = "" if cfg.init_lora_weights == "default" else f", {cfg.init_lora_weights} start"
    return f"{'DoRA' if cfg.use_dora else 'LoRA'} r={cfg.r} alpha={cfg.lora_alpha:g}{start}"


def _describe_adalora(cfg: TrainConfig, config: PeftConfig) -> str:
    assert isinstance(config, AdaLoraConfig)
    return (
        f"AdaLoRA init_r={config.init_r} -> average r={config.target_r} (cut between steps {config.tinit} and "
        f"{config.total_step - config.tfinal} of {config.total_step})"
    )


TRAIN_METHODS: dict[str, TrainMethod] = {
    m.name: m
    for m in (
        TrainMethod(
            "lora",
            "LoRA",
            lora_config,
            _describe_lora,
            "lora (the default; --dora for DoRA)",
            uses_rank=True,
        ),
        TrainMethod(
            "adalora",
            "AdaLoRA",
            adalora_config,
            _describe_adalora,
            "adalora (adaptive rank: --r is the average rank it ends at)",
            no_resume="the importance scores are not checkpointed; the checkpoint folder holds a loadable adapter "
            "with the ranks kept so far",
            no_fsdp="its rank allocation reads every adapter's whole gradient and masks ranks in place on one "
            "process, while FSDP leaves each process a shard",
            uses_rank=True,
        ),
        TrainMethod(
            "ia3",
            "IA³",
            ia3_config,
            lambda cfg, config: "IA³ (learned vectors)",
            "ia3 (learned vectors on keys, values and the MLP's down projection unless --targets; raise --lr, "
            "e.g. 3e-3)",
        ),
        TrainMethod(
            "prompt-tuning",
            "prompt tuning",
            prompt_tuning_config,
            _describe_prompt_tuning,
            "prompt-tuning (--virtual-tokens trained input embeddings; --prompt-init-text; raise --lr, e.g. 3e-2)",
        ),
        TrainMethod(
            "p-tuning",
            "P-tuning",
            p_tuning_config,
            lambda cfg, config: f"P-tuning, {cfg.num_virtual_tokens} virtual tokens from an MLP prompt encoder",
            "p-tuning (--virtual-tokens from an MLP prompt encoder)",
            no_resume="PEFT's P-tuning file holds the encoder's output, not the encoder, so training cannot continue "
            "from it",
        ),
        TrainMethod(
            "prefix-tuning",
            "prefix tuning",
            prefix_tuning_config,
            lambda cfg, config: f"prefix tuning, {cfg.num_virtual_tokens} virtual keys and values per layer",
            "prefix-tuning (--virtual-tokens keys and values in every attention layer)",
        ),
        TrainMethod(
            "houlsby",
            "bottleneck adapters (Houlsby)",
            houlsby_config,
            lambda cfg, config: f"Houlsby bottleneck adapters, reduction factor {cfg.reduction_factor}",
            "houlsby (bottleneck adapters after attention and MLP, --reduction-factor)",
        ),
        TrainMethod(
            "pfeiffer",
            "bottleneck adapters (Pfeiffer)",
            pfeiffer_config,
            lambda cfg, config: f"Pfeiffer bottleneck adapters, reduction factor {cfg.reduction_factor}",
            "pfeiffer (a bottleneck adapter after each MLP, --reduction-factor)",
        ),
    )
}

#: Every ``--method`` name: the adapter methods, then full fine-tuning.
METHODS = (*TRAIN_METHODS, FULL)
TITLES = {**{name: m.title for name, m in TRAIN_METHODS.items()}, FULL: "full fine-tuning"}


def adapter_config(cfg: TrainConfig, model: Any, total_steps: int) -> PeftConfig:
    """The adapter config a run trains (``cfg.method`` must name an adapter method, not ``full``)."""
    return TRAIN_METHODS[cfg.method].build(cfg, model, total_steps)
