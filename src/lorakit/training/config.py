"""``TrainConfig``: every setting of a ``lorakit train`` run, validated, loadable from YAML.

Precedence when the CLI builds one: built-in defaults < ``--config file.yaml`` < command-line flags.
The YAML file uses the same names as the fields below (``lora_alpha`` or the flag spelling ``alpha``;
dashes or underscores).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, suggest
from lorakit.kbit import QUANT_TYPES
from lorakit.training.methods import METHODS, TRAIN_METHODS
from lorakit.training.precision import DTYPES
from lorakit.training.starts import check_init

#: Optimizers by ``--optim`` name: torch's AdamW, or bitsandbytes' 8-bit / paged variants (QLoRA paper §3).
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OVERFLOW = ("truncate", "drop")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Flag spellings accepted in YAML files as aliases of field names.
ALIASES = {
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "lr": "learning_rate",
    "dora": "use_dora",
    "optimizer": "optim",
    "init": "init_lora_weights",
}


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: the bundled demo in a few minutes on 2 CPU cores)."""

    model: str | None = None  #: model folder, cached hub id, or None for the embedded SmolLM2-135M-Instruct
    data: str | None = None  #: training file, or None for the bundled ``dates`` task
    eval_data: str | None = None  #: held-out file for exact-match eval (default: the bundled eval split)
    output: str = "lorakit-output"
    method: str = "lora"  #: "lora", "adalora", "ia3", or "full" (every weight trains: bench_quality.py's baseline)
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_dora: bool = False  #: DoRA (magnitude × direction, arXiv 2402.09353) instead of plain LoRA
    lora_bias: bool = False  #: a trainable bias on each B (PEFT's lora_bias), merged into the base layer's bias
    bits: int | None = None  #: quantize the base to 4 (QLoRA: NF4 + double quant) or 8 bits; None keeps it as loaded
    quant_type: str = "nf4"  #: 4-bit code: nf4 (the QLoRA paper's NormalFloat) or fp4
    double_quant: bool = True  #: quantize the 4-bit blocks' scales again (8 bit): ~0.37 fewer bits per weight
    init_r: int | None = None  #: AdaLoRA: starting rank per matrix (default 1.5 × r; r is the average it ends at)
    tinit: int | None = None  #: AdaLoRA: warm-up steps before ranks are cut (default 10% of the run)
    tfinal: int | None = None  #: AdaLoRA: steps at the end with the final ranks (default 20% of the run)
    orth_reg_weight: float = 0.5  #: AdaLoRA: weight of the orthogonality penalty in the loss
    num_virtual_tokens: int = 20  #: prompt, prefix and P-tuning: virtual tokens the adapter adds
    prompt_init_text: str | None = None  #: prompt tuning: start from this text's token embeddings (else sampled vocab)
    reduction_factor: int = 16  #: bottleneck adapters (houlsby, pfeiffer): hidden size / bottleneck size
    #: how A and B start: default, gaussian, pissa, pissa_niter_<k>, olora, orthogonal (lorakit.training.starts)
    init_lora_weights: str = "default"
    loftq: bool = False  #: LoftQ start (arXiv 2310.08659, one iteration): Q + s·BA ≈ W instead of Q + 0
    gradient_checkpointing: bool = False  #: recompute activations in backward: less memory, ~30% more time
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    #: LoRA: also adapt these nn.Parameters (fused MoE experts, e.g. mlp.experts.gate_up_proj), r per expert
    target_parameters: list[str] | None = None
    #: LoRA: also train these rows of the input embedding (new special tokens); the file holds only those rows
    trainable_token_indices: list[int] | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    #: LoRA+ (arXiv 2402.12354 §4): B factors at lr x this ratio (the paper: 16); None = one lr for all
    loraplus_ratio: float | None = None
    optim: str = "adamw"  #: adamw, or bitsandbytes' adamw8bit / paged_adamw / paged_adamw8bit
    epochs: float = 1.0
    max_steps: int | None = None  #: overrides ``epochs`` when set
    batch_size: int = 8  #: examples per process per micro-batch
    grad_accum: int = 1
    max_length: int = 64
    overflow: str = "truncate"  #: what to do with examples longer than ``max_length``: truncate or drop
    seed: int = 0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    save_every: int = 50  #: checkpoint every N optimizer steps (0: only on Ctrl-C)
    keep_checkpoints: int = 2
    eval_limit: int | None = 100  #: eval rows used for before/after exact match (None: all)
    eval_batch_size: int = 100
    max_new_tokens: int = 16
    samples: int = 4  #: sample generations printed after training
    skip_eval: bool = False
    eval_before: bool = True  #: also evaluate the base model before training (the "before" column)
    device: str = "auto"
    dtype: str = "fp32"  #: fp32, bf16 or fp16: the frozen base's dtype and autocast's (adapters stay fp32)
    fsdp: bool = False  #: under torchrun: shard base and adapters across processes (FSDP2 fully_shard) instead of DDP
    keep_freed_memory: bool = True  #: on CPU, keep freed blocks for the next step (glibc): no page faults per step
    overwrite: bool = False
    resume: str | None = None  #: "latest" or a checkpoint folder

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------

    def validate(self) -> None:
        def positive(name: str, value: Any, allow_zero: bool = False) -> None:
            if value is None:
                return
            ok = value >= 0 if allow_zero else value > 0
            if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("r", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
            positive(name, getattr(self, name))
        positive("lora_alpha", self.lora_alpha)
        positive("learning_rate", self.learning_rate)
        positive("epochs", self.epochs)
        positive("max_steps", self.max_steps)
        positive("eval_limit", self.eval_limit)
        positive("max_grad_norm", self.max_grad_norm)
        for name in ("weight_decay", "warmup_steps", "save_every", "keep_checkpoints", "samples"):
            positive(name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"scheduler {self.scheduler!r} is not one of {SCHEDULERS}" + suggest(self.scheduler, SCHEDULERS)
            )
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {METHODS}" + suggest(str(self.method), METHODS))
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"bits must be 4 or 8 (or unset for the model as loaded), got {self.bits!r}")
        for name in ("init_r", "tinit", "tfinal"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.init_r is not None and self.init_r < self.r:
            raise ConfigError(f"init_r={self.init_r} < r={self.r}: AdaLoRA starts at init_r and lowers the rank to r")
        positive("orth_reg_weight", self.orth_reg_weight, allow_zero=True)
        for name in ("num_virtual_tokens", "reduction_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_init_text is not None and (
            not isinstance(self.prompt_init_text, str) or not self.prompt_init_text
        ):
            raise ConfigError(f"prompt_init_text must be a non-empty string, got {self.prompt_init_text!r}")
        if self.method != "adalora" and (self.init_r, self.tinit, self.tfinal) != (None, None, None):
            raise ConfigError("init_r, tinit and tfinal are AdaLoRA settings; add --method adalora")
        if self.bits is not None and self.method == "full":
            raise ConfigError(f"a {self.bits}-bit base trains adapters only; method {self.method!r} cannot use it")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type {self.quant_type!r} is not one of {QUANT_TYPES}")
        if self.loraplus_ratio is not None:
            positive("loraplus_ratio", self.loraplus_ratio)
            if self.method not in ("lora", "adalora"):
                raise ConfigError(
                    f"--loraplus-ratio speeds up LoRA's B factors; method {self.method!r} has none (use lora, adalora)"
                )
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim {self.optim!r} is not one of {OPTIMIZERS}" + suggest(str(self.optim), OPTIMIZERS))
        if not isinstance(self.loftq, bool):
            raise ConfigError(f"loftq must be true or false, got {self.loftq!r}")
        if self.loftq and (self.bits != 4 or self.quant_type != "nf4" or not self.double_quant):
            raise ConfigError(
                "loftq initialises adapters for the 4-bit NF4 base with double quantization (--qlora); got "
                f"bits={self.bits}, quant_type={self.quant_type!r}, double_quant={self.double_quant}"
            )
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.loftq and self.method != "lora":
            raise ConfigError(f"loftq initialises LoRA adapters, not method {self.method!r}")
        if self.use_dora and self.method != "lora":
            raise ConfigError(f"use_dora applies to method 'lora', not {self.method!r}; drop --dora or --method")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and (self.method != "lora" or self.use_dora or self.loftq):
            raise ConfigError(
                "lora_bias (--lora-bias) applies to plain LoRA (method 'lora', without --dora or --loftq), as in "
                f"PEFT; got method={self.method!r}, use_dora={self.use_dora}, loftq={self.loftq}"
            )
        check_init(self)
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"overflow {self.overflow!r} is not one of {OVERFLOW}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("target_modules is empty; give module names, a regex, or 'all-linear'")
        self._validate_tokens()
        self._validate_target_parameters()
        self._validate_scale()

    def _validate_target_parameters(self) -> None:
        names = self.target_parameters
        if names is None:
            return
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"target_parameters must be a non-empty list of parameter names such as mlp.experts.gate_up_proj, "
                f"got {names!r}"
            )
        if self.method != "lora" or self.use_dora or self.lora_dropout:
            raise ConfigError(
                "target_parameters (--target-parameters) applies to plain LoRA without dropout (method 'lora', no "
                f"--dora, --dropout 0), as in PEFT; got method={self.method!r}, use_dora={self.use_dora}, "
                f"lora_dropout={self.lora_dropout}"
            )

    def _validate_tokens(self) -> None:
        ids = self.trainable_token_indices
        if ids is None:
            return
        if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
            raise ConfigError(
                f"trainable_token_indices must be a non-empty list of token ids (non-negative integers), got {ids!r}"
            )
        if self.method != "lora":
            raise ConfigError(
                f"trainable_token_indices (--trainable-token-indices) trains embedding rows beside a LoRA adapter; "
                f"method {self.method!r} has no such option (use --method lora)"
            )

    def _validate_scale(self) -> None:
        """``dtype`` and ``fsdp``, and what each cannot be combined with."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}" + suggest(str(self.dtype), DTYPES))
        if self.dtype == "fp16" and str(self.device) == "cpu":
            raise ConfigError("--dtype fp16 is refused on the CPU (no fp16 matrix kernel, no loss scaling); use bf16")
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"fsdp must be true or false, got {self.fsdp!r}")
        if not self.fsdp:
            return
        if self.method == "full":
            raise ConfigError(
                "--fsdp shards a frozen base with its adapters; method 'full' trains every weight (use DDP)"
            )
        why = TRAIN_METHODS[self.method].no_fsdp
        if why:
            raise ConfigError(f"--fsdp is not supported for --method {self.method}: {why}")
        if self.bits is not None:
            raise ConfigError(
                "--fsdp with a quantized base (--qlora/--bits) is not supported by lorakit train; FSDP shards a "
                "4-bit base only with a float quant storage dtype (bitsandbytes' quant_storage), see the README"
            )
        if self.optim != "adamw":
            raise ConfigError(
                f"--fsdp steps sharded parameters with torch's AdamW; optim {self.optim!r} is not supported"
            )
        if self.dtype == "fp16":
            raise ConfigError(
                "--fsdp with --dtype fp16 is not supported: loss scaling over sharded gradients needs every process "
                "to agree on skipped steps, which lorakit train does not do yet; use --dtype bf16"
            )

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(cls, yaml_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Defaults, then the YAML file's values, then ``overrides`` (the flags the user actually gave).

        Raises:
            ConfigError: unreadable YAML, a key that is not a setting (with did-you-mean), a wrong type.
        """
        values: dict[str, Any] = {}
        if yaml_file is not None:
            values.update(_read_yaml(Path(yaml_file)))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong type reached a comparison
            raise ConfigError(f"invalid training setting: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: no such file") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: not a readable YAML file: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(loaded).__name__}")
    names = TrainConfig.field_names()
    out = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in names:
            raise ConfigError(
                f"--config {path}: unknown setting {key!r}" + suggest(name, [*names, *ALIASES]) + f"; settings: {names}"
            )
        out[name] = value
    return out
