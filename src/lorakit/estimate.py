"""Trainable-parameter counts and training-memory estimates from a model *config* alone: no weights are read.

The model is built from its config on PyTorch's ``meta`` device (shapes without storage), so every architecture
transformers knows has its exact module shapes, and the real :func:`lorakit.get_peft_model` adapts it there: the
counts are read from that adapted model (one source of truth: whatever a method creates is what is counted).

For LoRA (Hu et al. 2021, §4.1) a layer with weight ``W: (d, k)`` gets ``A: (r, k)`` and ``B: (d, r)``, i.e.
``r·(d + k)`` trainable values instead of ``d·k`` (``r·k·prod(kernel) + r·d`` for a convolution); DoRA adds a
magnitude per output (``d``), AdaLoRA ``r`` singular values.

Memory (bytes; GiB = 2**30 bytes) is split into weights, an fp32 master copy, gradients and optimizer state
("model states"), plus an activation figure that is a labelled rough estimate (:func:`activation_bytes`).
4-bit weights follow bitsandbytes' NF4 layout (Dettmers et al. 2023, QLoRA §3), see :func:`nf4_bytes`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import PeftConfig, TaskType
from lorakit.errors import ConfigError, MissingDependencyError, ModelNotFoundError, suggest
from lorakit.hub import DEFAULT_ALIASES, DEFAULT_MODEL, resolve_model
from lorakit.layers import ModulesToSaveWrapper
from lorakit.layers.kinds import HFConv1D
from lorakit.tasks import get_peft_model
from lorakit.tuners.lora import LoraConfig
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.param_names import strip_wrappers
from lorakit.tuners.lora.param_wrapper import ParamLoraLayer

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
_SMOLLM2 = {**_LLAMA, "vocab_size": 49152, "tie_word_embeddings": True, "max_position_embeddings": 8192}
#: Built-in configs (values of the published ``config.json`` files) so well-known models need no download.
PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-1 7B: the model of the figures usually quoted for LoRA (same shapes as LLaMA-2-7B).
    "llama-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                 "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "llama-2-7b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-13b": {**_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "tie_word_embeddings": False},
    # Mistral-7B-v0.1 (v0.3 has vocab_size 32768).
    "mistral-7b": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                   "sliding_window": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "smollm2-135m": {**_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5},
    "smollm2-360m": {**_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5, "rms_norm_eps": 1e-5},
    "smollm2-1.7b": {**_SMOLLM2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12,
             "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    "bert-base-uncased": {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768,
                          "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 30522},
}  # fmt: skip

#: The ``transformers`` Auto class that builds the model a task trains.
TASK_AUTO_CLASSES = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


# -- model configs --------------------------------------------------------------------------------------


def config_from_dict(data: dict[str, Any], origin: str) -> Any:
    """A transformers ``PretrainedConfig`` from a parsed ``config.json``.

    Raises:
        ConfigError: no ``model_type``, or one this transformers version does not know.
    """
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise ConfigError(
            f"{origin} has no 'model_type', so the architecture is unknown; add one such as \"model_type\": "
            f'"llama", or use a preset: {", ".join(PRESETS)}'
        )
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{origin}: model_type={model_type!r} is not known to the installed transformers"
            + suggest(model_type, CONFIG_MAPPING.keys())
        )
    return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in data.items() if k != "model_type"})


def preset_config(name: str) -> Any:
    """The config of a built-in preset (see :data:`PRESETS`).

    Raises:
        ConfigError: unknown preset; the message lists the presets and the closest names.
    """
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}" + suggest(key, PRESETS))
    return config_from_dict(dict(PRESETS[key]), f"preset {key!r}")


def config_from_file(path: str | os.PathLike) -> Any:
    """The config in a ``config.json`` file (or in a model folder holding one).

    Raises:
        ModelNotFoundError: the file does not exist. ConfigError: it is not a JSON object with a model_type.
    """
    path = Path(path)
    if path.is_dir():
        path = resolve_model(path, convert=False) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist; pass a config.json, a model folder or a preset name")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return config_from_dict(data, str(path))


def load_model_config(source: str | os.PathLike | None = None) -> tuple[Any, str]:
    """``(config, where it came from)`` for a preset, a ``config.json``, a model folder, a cached hub id or None.

    None (or an alias of the default model) reads the converted default model's config; when that cache does
    not exist yet the ``smollm2-135m`` preset (same shapes) is used instead of converting the weights.

    Raises:
        ConfigError: an unknown preset name. ModelNotFoundError: a path or hub id that is not there.
    """
    text = None if source is None else os.fspath(source)
    if text is None or text.lower() in DEFAULT_ALIASES - set(PRESETS) or text.lower() == DEFAULT_MODEL.lower():
        try:
            folder = resolve_model(text, convert=False)
        except (ModelNotFoundError, MissingDependencyError):
            return preset_config("smollm2-135m"), f"preset smollm2-135m ({DEFAULT_MODEL} is not converted yet)"
        return config_from_file(folder / "config.json"), str(folder)
    if text.lower() in PRESETS:
        return preset_config(text), f"preset {text.lower()} (built in, no download)"
    path = Path(text).expanduser()
    if path.exists():
        return config_from_file(path), str(path)
    presets = f"a preset ({', '.join(PRESETS)})"
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".json"):
        try:  # a hub id: only the local Hugging Face cache is looked at
            folder = resolve_model(text, convert=False)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{exc}; or use {presets}") from exc
        return config_from_file(folder / "config.json"), str(folder)
    if text.endswith(".json") or "/" in text or os.sep in text or text.startswith((".", "~")):
        raise ModelNotFoundError(f"{text} does not exist; pass a config.json, a model folder, a hub id or {presets}")
    return preset_config(text), ""  # raises: an unknown preset, with the closest names


def build_meta_model(
    config: Any, architecture: str | None = None, task_type: TaskType | str | None = None
) -> nn.Module:
    """The model ``config`` describes, built on the meta device (exact shapes, no memory, no weights).

    Class choice: ``architecture`` (a transformers class name) > ``task_type``'s Auto class >
    ``config.architectures[0]`` > ``AutoModelForCausalLM`` > ``AutoModel`` (encoders without an LM head).

    Raises:
        ConfigError: an unknown class name, or a task the architecture has no model class for.
    """
    import transformers

    if architecture:
        cls = getattr(transformers, architecture, None)
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            known = [n for n in dir(transformers) if "For" in n or n.endswith("Model")]
            raise ConfigError(
                f"architecture={architecture!r} is not a transformers model class" + suggest(architecture, known)
            )
        candidates = [cls]
    elif task_type is not None:
        task = TaskType(task_type)
        candidates = [getattr(transformers, TASK_AUTO_CLASSES[task])]
    else:
        named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])[:1]]
        candidates = [c for c in named if c is not None]
        candidates += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        except ValueError as exc:  # Auto classes: "Unrecognized configuration class ..."
            errors.append(f"{cls.__name__}: {exc}")
    raise ConfigError(f"cannot build a model for model_type={config.model_type!r}: " + "; ".join(errors))


# -- parameter counts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptedModule:
    """One adapter layer of the adapted model: ``params`` = trainable values of its A and B factors plus the
    variant's own (DoRA's magnitude, AdaLoRA's singular values)."""

    name: str
    kind: str  # the layer kind's name: "linear", "conv1d_hf", "embedding", "conv", "parameter" (E experts: E·r rows)
    in_features: int  # k (columns of ΔW): Linear in_features, Embedding num_embeddings, Conv in_channels
    out_features: int  # d (rows of ΔW)
    r: int
    a_size: int  # numel of A: r·k (r·k·prod(kernel) for convolutions)
    b_size: int  # numel of B: d·r
    m_size: int = 0  # numel of the variant's own parameters: DoRA's magnitude d, AdaLoRA's E r (0 for LoRA);
    # for a method without low-rank factors (IA³'s vectors) all of its values, with r = a_size = b_size = 0

    @property
    def params(self) -> int:
        return self.a_size + self.b_size + self.m_size


@dataclass
class ParameterEstimate:
    """Exact counts for one (model, adapter config) pair, read from the adapted model; sizes are numels of
    individual tensors."""

    model_class: str
    total: int  # base model parameters, tied weights counted once (= sum(p.numel() for p in model.parameters()))
    modules: list[AdaptedModule]
    base_tensor_sizes: list[int]  # every base parameter tensor (full fine-tuning trains all of them)
    quantized_sizes: list[int]  # weights bitsandbytes would store in 4 bit (Linear/Conv1D, not the output head)
    modules_to_save: int = 0  # parameters of full trainable copies (``modules_to_save`` and task heads)
    bias: int = 0  # base biases made trainable by ``bias="all"|"lora_only"``
    extra_tensor_sizes: list[int] = field(default_factory=list)  # the tensors behind the two fields above
    lm_head: bool = True  # the model ends in vocabulary logits (an output embedding), which cost activations

    @property
    def adapter(self) -> int:
        """Adapter parameters: ``Σ r·(d + k)`` over the adapted modules (``+ d`` each with DoRA)."""
        return sum(m.params for m in self.modules)

    @property
    def trainable(self) -> int:
        """What ``get_nb_trainable_parameters()[0]`` reports after ``get_peft_model``."""
        return self.adapter + self.modules_to_save + self.bias

    def adapter_tensor_sizes(self) -> list[int]:
        return [s for m in self.modules for s in (m.a_size, m.b_size, m.m_size) if s]

    def groups(self) -> list[tuple[str, str, int, int, int, int, int]]:
        """``(leaf name, kind, k, d, r, parameters each, how many)`` per distinct layer shape, in model order (a
        parameter's leaf name includes its module's: ``experts.down_proj``)."""
        counts: dict[tuple[str, str, int, int, int, int], int] = {}
        for m in self.modules:
            parts = 2 if m.kind == "parameter" else 1  # a parameter by its module too: experts.down_proj, gate.weight
            key = (".".join(m.name.split(".")[-parts:]), m.kind, m.in_features, m.out_features, m.r, m.params)
            counts[key] = counts.get(key, 0) + 1
        return [(*key, n) for key, n in counts.items()]


def count_parameters(model: nn.Module, config: PeftConfig) -> ParameterEstimate:
    """Exact trainable and total parameter counts of ``get_peft_model(model, config)``, read from the real
    adapted model built on the meta device.

    A meta copy of ``model`` (shapes only; ``model`` itself, on the meta device or not, is left untouched) is
    handed to :func:`lorakit.get_peft_model` with ``config``, so targeting, ranks, variants (DoRA, AdaLoRA),
    task heads, ``modules_to_save`` and biases are whatever the real injection makes of them: no rule is
    repeated here. A walk over the adapted model's adapter layers gives ``modules`` (its LoRA layers) and
    ``modules_to_save`` (its trainable copies); ``bias`` is every other parameter it trains.

    Raises:
        TargetNotFoundError: ``target_modules`` matches nothing (the message lists the model's module names).
        UnsupportedModuleError: a target is of a type LoRA cannot wrap.
        ConfigError: any other config the model refuses (e.g. a ``modules_to_save`` entry matching nothing).
    """
    base = _meta_copy(model)
    sizes = [p.numel() for p in base.parameters()]  # deduplicated: a tied weight appears once
    estimate = ParameterEstimate(
        model_class=type(model).__name__,
        total=sum(sizes),
        modules=[],
        base_tensor_sizes=sizes,
        quantized_sizes=_quantizable_sizes(base),
        lm_head=getattr(base, "get_output_embeddings", lambda: None)() is not None,
    )
    with warnings.catch_warnings():  # the user saw the config's warnings when building it
        warnings.simplefilter("ignore")
        # an estimate is of training (a saved adapter's config says inference_mode=True), and LoftQ rewrites real
        # base weights, which meta tensors do not have: it creates the same shapes as the default init
        config = dataclasses.replace(config, inference_mode=False)
        if getattr(config, "init_lora_weights", None) == "loftq":
            config = dataclasses.replace(config, init_lora_weights=True)
    with torch.device("meta"):  # the adapter's own tensors are created without storage too
        adapted = get_peft_model(base, config)
    adapter = adapted.active_adapter
    counted: set[int] = set()
    for name, layer in adapted.base_model.adapter_layers():
        params = layer.adapter_parameters(adapter)
        counted.update(id(p) for p in params)
        if isinstance(layer, ModulesToSaveWrapper):  # a full trainable copy of the module
            estimate.modules_to_save += sum(p.numel() for p in params)
            estimate.extra_tensor_sizes += [p.numel() for p in params]
        elif isinstance(layer, LoraLayer):
            a, b, *own = params  # A, B, then the variant's own (adapter_parameters' order)
            size = sum(p.numel() for p in own)
            shape = (layer.in_features, layer.out_features, layer.r[adapter])
            if isinstance(layer, ParamLoraLayer):  # target_parameters: named by the parameter, r per expert
                name = f"{strip_wrappers(name)}.{layer.parameter_name}"
            estimate.modules.append(AdaptedModule(name, layer.kind.name, *shape, a.numel(), b.numel(), size))
        elif params:  # another method's layer (no low-rank factors): its values count as the module's own
            k, d = layer.kind.features(layer.base_layer)
            estimate.modules.append(AdaptedModule(name, layer.kind.name, k, d, 0, 0, 0, sum(p.numel() for p in params)))
    inside_base = {id(p) for p in adapted.get_base_model().parameters()}
    own: dict[str, int] = collections.defaultdict(int)
    for name, p in adapted.named_parameters():  # what else trains
        if not p.requires_grad or id(p) in counted:
            continue
        if id(p) in inside_base:  # a base bias that ``bias`` makes trainable
            estimate.bias += p.numel()
            estimate.extra_tensor_sizes.append(p.numel())
        else:  # the method's own modules outside the model (a prompt encoder): one row per such module
            own[name.removeprefix("base_model.").split(".", 1)[0]] += p.numel()
    estimate.modules += [AdaptedModule(module, "own", 0, 0, 0, 0, 0, n) for module, n in own.items()]
    return estimate


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors of the same shapes (ties kept)."""
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in memo:
            meta = torch.empty_like(tensor, device="meta")
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if is_param else meta
    return copy.deepcopy(model, memo)


def _quantizable_sizes(model: nn.Module) -> list[int]:
    """Numels of the weights transformers' ``replace_with_bnb_linear`` quantizes: exact ``nn.Linear`` and
    ``Conv1D`` modules, minus those it keeps in full precision (``get_keys_to_not_convert``): the output head,
    tied weights' owners and the module holding the last parameter (e.g. a classifier)."""
    names = [n for n, _ in model.named_parameters()]
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys = set(tied) | set(tied.values()) | set(names[-1:])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys |= {n for n, m in model.named_modules() if head is not None and m is head}
    skip = {k.removesuffix(".weight") for k in keys}
    return [
        m.weight.numel()
        for name, m in model.named_modules()
        if (type(m) is nn.Linear or (HFConv1D is not None and isinstance(m, HFConv1D)))
        and not any(name == s or name.startswith(s + ".") or name.endswith(s) for s in skip)
    ]


def layer_comparison(d: int, k: int, r: int) -> dict[str, float]:
    """One ``d × k`` weight: full fine-tuning trains ``d·k`` values, LoRA ``r·(d + k)`` (Hu et al. 2021, §4.1).

    Raises:
        ConfigError: a non-positive size or rank.
    """
    if min(d, k, r) <= 0:
        raise ConfigError(f"layer {d}x{k} with r={r} is invalid; sizes and rank must be positive integers")
    full, lora = d * k, r * (d + k)
    return {"d": d, "k": k, "r": r, "full": full, "lora": lora, "ratio": full / lora}


# -- memory -------------------------------------------------------------------------------------------


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256) -> int:
    """Bytes bitsandbytes needs to hold one weight tensor of ``numel`` values in NF4.

    * data: 4 bits per value, two per byte: ``ceil(n / 2)``;
    * one absmax constant per block of ``blocksize`` (64) values, ``b = ceil(n / 64)`` blocks:
      fp32 without double quantization (``4·b`` bytes, 0.5 bits/value), or with it (QLoRA §3) 8-bit constants
      (``b`` bytes) plus one fp32 constant per ``dq_blocksize`` (256) of them and one fp32 offset per tensor:
      ``b + 4·ceil(b / 256) + 4`` bytes, i.e. 8/64 + 32/(64·256) ≈ 0.127 bits/value.

    The 16-entry NF4 and 256-entry 8-bit code tables are shared lookup tables and not counted.
    """
    blocks = -(-numel // blocksize)
    constants = blocks + 4 * -(-blocks // dq_blocksize) + 4 if double_quant else 4 * blocks
    return -(-numel // 2) + constants


def optimizer_bytes(sizes: list[int], optim: str) -> int:
    """Optimizer state for trainable tensors of these numels.

    ``adamw``: two fp32 moments, 8 bytes/value. ``adamw8bit`` (bitsandbytes blockwise 8-bit Adam): two
    1-byte states plus one fp32 absmax per 256 values each; tensors under 4096 values keep fp32 states.
    ``sgd``: plain SGD without momentum, no state.
    """
    if optim == "adamw":
        return 8 * sum(sizes)
    if optim == "adamw8bit":
        return sum(8 * n if n < 4096 else 2 * (n + 4 * -(-n // 256)) for n in sizes)
    if optim == "sgd":
        return 0
    raise ConfigError(f"optim={optim!r} is not known; accepted: {', '.join(OPTIMIZERS)}")


@dataclass
class TrainingSetup:
    """The assumptions a memory estimate rests on (each one is printed with the table)."""

    dtype: str = "bf16"  # storage dtype of the base weights (and of full fine-tuning's weights and gradients)
    optim: str = "adamw"
    master_weights: bool = True  # full FT in bf16/fp16 keeps an fp32 copy of every weight (mixed precision)
    double_quant: bool = True  # QLoRA: quantize the NF4 absmax constants too
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"dtype={self.dtype!r} is not known; accepted: {', '.join(DTYPE_BYTES)}")
        optimizer_bytes([], self.optim)
        if self.batch_size <= 0 or self.seq_len <= 0:
            raise ConfigError(f"batch_size={self.batch_size}, seq_len={self.seq_len}: both must be positive")


@dataclass
class MemoryBreakdown:
    """Bytes of one training setup; ``activations`` is None when the config lacks the sizes to estimate it."""

    weights: int
    master_weights: int
    gradients: int
    optimizer: int
    activations: int | None

    @property
    def model_states(self) -> int:
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + (self.activations or 0)


def estimate_memory(est: ParameterEstimate, model_config: Any, setup: TrainingSetup) -> dict[str, MemoryBreakdown]:
    """Training memory of full fine-tuning, LoRA and QLoRA (keys ``"full"``, ``"lora"``, ``"qlora"``).

    * full: weights and gradients in ``dtype``; an fp32 master copy (4 B/value) when ``dtype`` is 16-bit and
      ``master_weights``; optimizer state for every parameter.
    * lora: frozen base in ``dtype``; adapter factors in fp32 (lorakit keeps them fp32 on a 16-bit base), with
      fp32 gradients and optimizer state; ``modules_to_save`` copies and trainable biases in ``dtype``.
    * qlora: as lora, but each quantizable weight in NF4 (:func:`nf4_bytes`); the rest of the base in ``dtype``.
    """
    e = DTYPE_BYTES[setup.dtype]
    activations = activation_bytes(model_config, setup, logits=est.lm_head)
    full = MemoryBreakdown(
        weights=e * est.total,
        master_weights=4 * est.total if (e < 4 and setup.master_weights) else 0,
        gradients=e * est.total,
        optimizer=optimizer_bytes(est.base_tensor_sizes, setup.optim),
        activations=activations,
    )
    extra = est.modules_to_save + est.bias
    adapter_states = dict(
        master_weights=0,
        gradients=4 * est.adapter + e * extra,
        optimizer=optimizer_bytes(est.adapter_tensor_sizes() + est.extra_tensor_sizes, setup.optim),
        activations=activations,
    )
    trainable_weights = 4 * est.adapter + e * est.modules_to_save
    lora = MemoryBreakdown(weights=e * est.total + trainable_weights, **adapter_states)
    quantized = sum(est.quantized_sizes)
    four_bit = sum(nf4_bytes(n, double_quant=setup.double_quant) for n in est.quantized_sizes)
    qlora = MemoryBreakdown(weights=four_bit + e * (est.total - quantized) + trainable_weights, **adapter_states)
    return {"full": full, "lora": lora, "qlora": qlora}


def activation_sizes(model_config: Any) -> dict[str, int] | None:
    """``h, h_kv, i, layers, vocab`` read from a config (GPT-2's ``n_embd`` etc. through transformers'
    attribute map), or None when one is missing."""
    h = getattr(model_config, "hidden_size", None)
    layers = getattr(model_config, "num_hidden_layers", None)
    heads = getattr(model_config, "num_attention_heads", None)
    vocab = getattr(model_config, "vocab_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (h, layers, heads, vocab)):
        return None
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    i = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * h
    return {"h": h, "h_kv": h * kv_heads // heads, "i": i, "layers": layers, "vocab": vocab}


def activation_bytes(model_config: Any, setup: TrainingSetup, logits: bool = True) -> int | None:
    """A rough estimate of what autograd keeps for the backward pass of one step (None without sizes).

    Per token, in values of the compute dtype, for a LLaMA-style decoder layer (two norms, attention with
    ``h_kv``-wide keys/values through SDPA/flash attention, so no ``seq × seq`` score matrix, SwiGLU MLP of
    width ``i``, no dropout)::

        layer = 2h (norm inputs) + 3h + 2h_kv (q/k/v input, rotated q and k, v, attention output) + h + 4i (MLP)

    Without checkpointing every layer keeps ``layer``; with gradient checkpointing each keeps only its input
    ``h`` and one layer's ``layer`` is rebuilt at a time. With ``logits`` (a language-model head) each token
    adds ``vocab`` values in the compute dtype plus two fp32 copies (upcast and log-softmax). Encoders, GELU
    MLPs, dropout and eager attention store different amounts; LoRA's own activations (r values per adapted
    layer, plus a dropout copy of the input when ``lora_dropout > 0``) are left out. The frozen layers of
    LoRA/QLoRA keep the same activations, because the gradient flows through them to the adapters.
    """
    sizes = activation_sizes(model_config)
    if sizes is None:
        return None
    h, h_kv, i, layers, vocab = (sizes[k] for k in ("h", "h_kv", "i", "layers", "vocab"))
    e = DTYPE_BYTES[setup.dtype]
    per_layer = 6 * h + 2 * h_kv + 4 * i
    stored = layers * h + per_layer if setup.gradient_checkpointing else layers * per_layer
    head = 0 if not logits else vocab * (e + 8) if e < 4 else vocab * 8
    return setup.batch_size * setup.seq_len * (e * stored + head)


# -- the figures quoted for LoRA and QLoRA on LLaMA-7B -------------------------------------------------

QUOTED_CHOICES = {
    "q_proj, v_proj": ["q_proj", "v_proj"],
    "q, k, v, o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "q, k, v, o, gate, up, down": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def quoted_figures(r: int = 8) -> dict[str, Any]:
    """The figures usually quoted for LoRA and QLoRA, recomputed exactly (LLaMA-7B from the ``llama-7b`` preset).

    The quotes: one 4096×4096 layer at r = 8 trains r(d+k) = 65,536 instead of dk = 16,777,216 values (the count
    of LoRA, Hu et al. 2021, arXiv 2106.09685, §4.1); "~4–8M" LoRA parameters for LLaMA-7B; ~112 GB to fine-tune
    it fully in fp32 with AdamW; ~4 GB for its weights in NF4 with double quantization (QLoRA, Dettmers et al.
    2023, arXiv 2305.14314, §3). Returns a dict with ``layer`` (the 4096×4096 layer at rank r), ``counts``
    (LoRA parameters per target choice), ``ranks_in_quoted_range`` (ranks at which all seven projections give
    4–8M), ``total``, the fp32 memory (full FT and LoRA with AdamW), and the NF4 + double-quant weight bytes.
    """
    config = preset_config("llama-7b")
    model = build_meta_model(config)
    all_seven = QUOTED_CHOICES["q, k, v, o, gate, up, down"]
    est = count_parameters(model, LoraConfig(r=r, target_modules=all_seven))

    def adapter(rank: int, targets: list[str]) -> int:  # each count adapts a 7B meta model: reuse the one above
        if rank == r and targets is all_seven:
            return est.adapter
        return count_parameters(model, LoraConfig(r=rank, target_modules=targets)).adapter

    counts = {label: adapter(r, t) for label, t in QUOTED_CHOICES.items()}
    per_rank = {rank: adapter(rank, all_seven) for rank in range(1, 9)}
    fp32 = estimate_memory(est, config, TrainingSetup(dtype="fp32"))
    bf16 = estimate_memory(est, config, TrainingSetup(dtype="bf16"))
    plain = estimate_memory(est, config, TrainingSetup(dtype="bf16", double_quant=False))
    quantized = sum(est.quantized_sizes)
    return {
        "layer": layer_comparison(4096, 4096, r),
        "r": r,
        "total": est.total,
        "counts": counts,
        "ranks_in_quoted_range": [k for k, v in per_rank.items() if 4_000_000 <= v <= 8_000_000],
        "ratio_all_seven": est.total / est.adapter,
        "fp32_full_model_states": fp32["full"].model_states,
        "fp32_lora_model_states": fp32["lora"].model_states,
        "nf4": {
            "quantized_params": quantized,
            "nf4_data_bytes": sum(-(-n // 2) for n in est.quantized_sizes),
            "double_quant_constant_bytes": sum(nf4_bytes(n) - (-(-n // 2)) for n in est.quantized_sizes),
            "bf16_rest_bytes": 2 * (est.total - quantized),
            "weights_bytes": bf16["qlora"].weights - 4 * est.adapter,
            "weights_bytes_no_double_quant": plain["qlora"].weights - 4 * est.adapter,
            "qlora_model_states_bytes": bf16["qlora"].model_states,
        },
    }
