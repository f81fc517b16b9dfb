"""``lorakit estimate``: trainable parameters and training memory from a model config alone (no weights)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from typing import Any

EXAMPLES = """\
examples:
  # LLaMA-2-7B, LoRA r=8 on every linear layer: exact counts, full FT vs LoRA vs QLoRA memory
  lorakit estimate llama-2-7b

  # another method: IA³ on the architecture's default targets; AdaLoRA starting at rank 12
  lorakit estimate llama-2-7b --method ia3
  lorakit estimate llama-2-7b --method adalora --r 12

  # the figures usually quoted for LoRA and QLoRA, recomputed exactly (4096x4096 at r=8; LLaMA-7B counts; NF4 ~4 GB)
  lorakit estimate --quoted-figures

  # one layer: r(d+k) vs d*k
  lorakit estimate --layer 4096x4096 --r 8

  # any config.json or model folder; only q and v at r=16, layers 0-3, 8-bit AdamW, batch 4 x 2048 tokens
  lorakit estimate path/to/config.json --targets q_proj v_proj --r 16 --layers 0 1 2 3 --optim adamw8bit \\
      --batch-size 4 --seq-len 2048 --gradient-checkpointing

  # an existing adapter_config.json (PEFT or lorakit), machine-readable output
  lorakit estimate mistral-7b --adapter-config runs/dates/adapter_config.json --json

Inputs: a preset (listed above), a config.json, a model folder, a hub id already in the local Hugging Face
cache, or nothing (the default SmolLM2-135M-Instruct). The model is built on PyTorch's meta device: exact
shapes, no weights, no download. Memory is in GiB (2^30 bytes); every assumption is printed with the table.
"""

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")
_TASKS = ["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"]


def _layer(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[x×*,]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer shape; write DxK, e.g. 4096x4096")
    return int(match.group(1)), int(match.group(2))


def _pattern(text: str) -> tuple[str, int]:
    key, sep, value = text.rpartition("=")
    if not sep or not key or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=RANK, e.g. q_proj=16 or 'layers\\.0\\..*=4'")
    return key, int(value)


def add_parser(sub: Any) -> None:
    from lorakit.estimate import PRESETS

    p = sub.add_parser(
        "estimate",
        help="trainable parameters and training memory (full FT vs an adapter method) from a config alone",
        description=textwrap.fill(
            "Exact adapter parameter counts (LoRA by default; --method) and a training-memory table for full "
            "fine-tuning, the adapter and the adapter on a 4-bit NF4 base (QLoRA for LoRA), "
            "computed from a model config without loading weights. Presets: " + ", ".join(PRESETS) + ".",
            width=100,
            break_on_hyphens=False,
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    S = argparse.SUPPRESS  # a LoRA flag not given leaves --adapter-config's (or LoraConfig's) value in place
    p.add_argument("source", nargs="?", help="preset, config.json, model folder or cached hub id (default: SmolLM2)")
    p.add_argument("--model", dest="model_opt", metavar="SOURCE", help="the same as the positional SOURCE")
    p.add_argument(
        "--arch", metavar="CLASS", help="transformers model class to build, e.g. LlamaForSequenceClassification"
    )
    p.add_argument("--task", choices=_TASKS, default=S, help="task type: picks the model class and trained heads")
    p.add_argument(
        "--method",
        choices=list(_method_configs()),
        default=S,
        help="the adapter method counted (lora; --adapter-config's peft_type when that is given)",
    )
    g = p.add_argument_group("adapter settings (the same meaning as the config fields; those a method has)")
    g.add_argument("--r", "-r", type=int, default=S, help="rank (8)")
    g.add_argument(
        "--targets",
        dest="target_modules",
        metavar="NAME",
        nargs="+",
        default=S,
        help="module names (q_proj v_proj ... or comma-separated), one regex, all-linear (the default), or "
        "'default' for the architecture's default (q_proj, v_proj on LLaMA)",
    )
    g.add_argument(
        "--target-parameters",
        dest="target_parameters",
        metavar="NAME",
        nargs="+",
        default=S,
        help="LoRA on parameters, e.g. mlp.experts.gate_up_proj mlp.experts.down_proj (fused MoE experts)",
    )
    g.add_argument(
        "--exclude", dest="exclude_modules", metavar="NAME", nargs="+", default=S, help="module names never adapted"
    )
    g.add_argument(
        "--layers", dest="layers_to_transform", metavar="N", type=int, nargs="+", default=S, help="layer indices only"
    )
    g.add_argument(
        "--layers-pattern", dest="layers_pattern", metavar="NAME", default=S, help="name of the layer list, e.g. layers"
    )
    g.add_argument(
        "--rank-pattern",
        dest="rank_pattern",
        metavar="NAME=RANK",
        type=_pattern,
        nargs="+",
        default=S,
        help="per-module ranks overriding --r",
    )
    g.add_argument(
        "--modules-to-save", dest="modules_to_save", metavar="NAME", nargs="+", default=S, help="fully trained modules"
    )
    g.add_argument("--bias", choices=["none", "all", "lora_only"], default=S, help="trainable biases (none)")
    g.add_argument("--dora", dest="use_dora", action="store_true", default=S, help="DoRA: + one magnitude per output")
    g.add_argument(
        "--virtual-tokens", dest="num_virtual_tokens", type=int, default=S, help="prompt methods: virtual tokens (20)"
    )
    g.add_argument(
        "--reduction-factor", dest="reduction_factor", type=int, default=S, help="bottleneck: hidden / bottleneck (16)"
    )
    g.add_argument(
        "--adapter-config",
        dest="adapter_config",
        metavar="FILE",
        help="read the adapter's settings (any method) from adapter_config.json",
    )
    g = p.add_argument_group("memory")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weight dtype (bf16)")
    g.add_argument("--optim", choices=["adamw", "adamw8bit", "sgd"], default="adamw", help="optimizer (adamw)")
    g.add_argument(
        "--no-master-weights",
        dest="master_weights",
        action="store_false",
        help="full FT in bf16/fp16 without an fp32 master copy of the weights (counted by default)",
    )
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="QLoRA without double quant")
    g.add_argument("--batch-size", metavar="N", type=int, default=1, help="sequences per step, for activations (1)")
    g.add_argument("--seq-len", metavar="N", type=int, default=512, help="tokens per sequence, for activations (512)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="activations with checkpointing")
    g = p.add_argument_group("other modes and output")
    g.add_argument("--layer", type=_layer, metavar="DxK", help="only compare one DxK weight: r(d+k) vs d*k")
    g.add_argument(
        "--quoted-figures",
        action="store_true",
        help="recompute the figures usually quoted for LoRA and QLoRA on LLaMA-7B (65,536 vs 16,777,216; ~4 GB NF4)",
    )
    g.add_argument("--seed-check", dest="quoted_figures", action="store_true", help=argparse.SUPPRESS)  # old name
    g.add_argument("--json", nargs="?", const="-", metavar="FILE", help="JSON to FILE (or to stdout instead of text)")
    p.set_defaults(run=run)


def _method_configs() -> dict[str, tuple[Any, dict[str, Any], dict[str, str]]]:
    """``--method`` name -> (config class, defaults, flag renames). The estimate counts whatever the method's
    real injection creates; a method's entry only says how the flags read for it."""
    from lorakit.tuners.adalora import AdaLoraConfig
    from lorakit.tuners.bottleneck import BottleneckConfig
    from lorakit.tuners.ia3 import IA3Config
    from lorakit.tuners.lora import LoraConfig
    from lorakit.tuners.p_tuning import PromptEncoderConfig
    from lorakit.tuners.prefix_tuning import PrefixTuningConfig
    from lorakit.tuners.prompt_tuning import PromptTuningConfig

    causal = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 20}  # a prompt method needs a task; --task overrides
    return {
        "lora": (LoraConfig, {"target_modules": "all-linear"}, {}),
        # AdaLoRA trains init_r triplets until it cuts them; the schedule's length changes no count
        "adalora": (AdaLoraConfig, {"target_modules": "all-linear", "total_step": 1000}, {"r": "init_r"}),
        "ia3": (IA3Config, {}, {}),  # the architecture's default targets (keys, values, feedforward)
        "prompt-tuning": (PromptTuningConfig, causal, {}),
        "p-tuning": (PromptEncoderConfig, causal, {}),
        "prefix-tuning": (PrefixTuningConfig, causal, {}),
        "houlsby": (BottleneckConfig, BottleneckConfig.houlsby().to_dict(), {}),
        "pfeiffer": (BottleneckConfig, BottleneckConfig.pfeiffer().to_dict(), {}),
    }


#: Flags -> config fields; a flag given for a method whose config lacks the field is an error.
_FIELDS = (
    "r exclude_modules layers_to_transform layers_pattern modules_to_save bias target_modules target_parameters "
    "rank_pattern use_dora "
    "num_virtual_tokens reduction_factor"
).split()


def adapter_config(args: argparse.Namespace) -> Any:
    """The adapter config the flags describe (flags override ``--adapter-config``, whose method is kept).

    Raises:
        ConfigError: a flag the method has no field for (e.g. ``--r`` with IA³), or ``--method`` contradicting
            ``--adapter-config``.
    """
    import dataclasses

    from lorakit.config import PeftConfig
    from lorakit.errors import ConfigError

    methods = _method_configs()
    given = {f: getattr(args, f) for f in _FIELDS if hasattr(args, f)}
    if hasattr(args, "task"):
        given["task_type"] = args.task
    if "rank_pattern" in given:
        given["rank_pattern"] = dict(given["rank_pattern"])
    if "target_modules" in given:
        given["target_modules"] = _targets(given["target_modules"])
    saved = PeftConfig.from_pretrained(args.adapter_config) if args.adapter_config else None
    name = getattr(args, "method", "lora")
    if saved is not None:
        found = next((n for n, (cls, _, _) in methods.items() if type(saved) is cls), None)
        if hasattr(args, "method") and args.method != found:
            raise ConfigError(
                f"--method {args.method} contradicts --adapter-config, which holds a {saved.NAME} adapter"
            )
        name = found or name
    cls, defaults, renames = methods[name] if saved is None or name in methods else (type(saved), {}, {})
    given = {renames.get(k, k): v for k, v in given.items()}
    refused = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if refused:
        flags = ", ".join("--" + next((k for k, v in renames.items() if v == f), f).replace("_", "-") for f in refused)
        raise ConfigError(f"{flags}: not a setting of {cls.NAME} ({cls.__name__}); drop it or pick another --method")
    if saved is not None:
        return cls.from_pretrained(args.adapter_config, **given)
    return cls(**{**defaults, **given})


def _targets(values: list[str]) -> list[str] | str | None:
    if len(values) == 1 and values[0] in ("all-linear", "default"):
        return None if values[0] == "default" else "all-linear"
    if len(values) == 1 and _REGEX_CHARS.search(values[0]):
        return values[0]
    return [name for v in values for name in v.split(",") if name]


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``lorakit estimate`` reports, as a JSON-ready dict (sizes in parameters, memory in bytes)."""
    import lorakit.estimate as E
    from lorakit.targeting import resolve_target_modules

    if args.layer:
        return {"layer": E.layer_comparison(*args.layer, getattr(args, "r", 8))}
    if args.quoted_figures:
        return {"quoted_figures": E.quoted_figures(getattr(args, "r", 8))}
    config = adapter_config(args)
    model_config, origin = E.load_model_config(args.model_opt or args.source)
    model = E.build_meta_model(model_config, args.arch, config.task_type)
    est = E.count_parameters(model, config)
    setup = E.TrainingSetup(
        dtype=args.dtype,
        optim=args.optim,
        master_weights=args.master_weights,
        double_quant=args.double_quant,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    memory = E.estimate_memory(est, model_config, setup)
    quantized = sum(est.quantized_sizes)
    return {
        "model": {
            "source": args.model_opt or args.source or "default",
            "origin": origin,
            "class": est.model_class,
            "model_type": model_config.model_type,
            "total_params": est.total,
        },
        "adapter": {
            "method": config.NAME,
            "summary": config.summary().splitlines()[0],
            "config": {k: v for k, v in config.to_dict().items() if v not in (None, [], {}, False)},
            "target_modules": resolve_target_modules(model, config) if hasattr(config, "target_modules") else None,
            "modules": len(est.modules),
            "groups": [
                {"name": n, "kind": kind, "in": k, "out": d, "r": r, "count": c, "params_each": each}
                for n, kind, k, d, r, each, c in est.groups()
            ],
            "adapter_params": est.adapter,
            "modules_to_save_params": est.modules_to_save,
            "bias_params": est.bias,
            "trainable_params": est.trainable,
            "lm_head": est.lm_head,
        },
        "memory": {mode: {**vars(b), "model_states": b.model_states, "total": b.total} for mode, b in memory.items()},
        "qlora": {
            "quantized_params": quantized,
            "quantized_bytes": sum(E.nf4_bytes(n, double_quant=setup.double_quant) for n in est.quantized_sizes),
            "unquantized_params": est.total - quantized,
        },
        "setup": vars(setup),
        "activation_sizes": E.activation_sizes(model_config),
    }


def run(args: argparse.Namespace) -> int:
    result = collect(args)
    if args.json == "-":
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
            fh.write("\n")
    if "layer" in result:
        print_layer(result["layer"])
    elif "quoted_figures" in result:
        print_quoted_figures(result["quoted_figures"])
    else:
        print_estimate(result)
    return 0


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:,.2f}"


def print_layer(layer: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    d, k, r = layer["d"], layer["k"], layer["r"]
    print(f"layer {d} x {k}: full fine-tuning trains d*k = {layer['full']:,} values", file=out)
    print(f"LoRA r={r}: r*(d+k) = {r}*({d}+{k}) = {layer['lora']:,} values", file=out)
    if layer["ratio"] >= 1:
        print(f"-> {layer['ratio']:,.4g}x fewer ({100 / layer['ratio']:.4g}% of the full count)", file=out)
    else:  # r > d·k / (d + k): the factors hold more values than the matrix
        print(f"-> {1 / layer['ratio']:,.4g}x MORE than the full matrix: r={r} is too large for it", file=out)


def print_estimate(res: dict[str, Any]) -> None:
    m, lora, mem, setup = res["model"], res["adapter"], res["memory"], res["setup"]
    name = lora["method"]
    low_bit = "QLoRA" if name == "LoRA" else f"{name}+NF4"
    total = m["total_params"]
    print(f"model       {m['source']}: {m['class']} (model_type {m['model_type']}); from {m['origin']}")
    print(f"parameters  {total:,} in the base model (tied weights counted once; no weights were read)")
    cfg = lora["config"]
    targets = lora["target_modules"]
    shown = f"{targets!r}" + ("" if "target_modules" in cfg else " (the architecture's default)")
    where = f", target_modules={shown}" if targets is not None else ""
    print(f"\n{lora['summary']}{where} -> {lora['modules']} modules")
    ranked = any(g["r"] for g in lora["groups"])
    each = "r(k+d) each" if ranked else "values each"
    kw = max([10, *(len(g["kind"]) for g in lora["groups"])])
    rank = "r" if ranked else ""
    print(f"  {'module':<16} {'kind':<{kw}} {'k (in)':>8} {'d (out)':>8} {rank:>4} {'count':>6} {each:>13}")
    for g in lora["groups"]:
        k, d = (g["in"], g["out"]) if g["kind"] != "own" else ("-", "-")
        print(
            f"  {g['name']:<16} {g['kind']:<{kw}} {k:>8} {d:>8} {g['r'] if ranked else '':>4} "
            f"{'x' + str(g['count']):>6} {g['params_each']:>13,}"
        )
    if ranked and any(g["kind"] == "conv" for g in lora["groups"]):
        print("  (convolutions: A has r*k*kernel values, not r*k)")
    if ranked and any(g["kind"] == "parameter" for g in lora["groups"]):
        print("  (parameters, target_parameters: r per expert, E*r(k+d) values for E experts)")
    if cfg.get("use_dora"):
        print("  (DoRA: each also trains a magnitude per output, d values)")
    labels = {"modules_to_save_params": "in modules_to_save copies", "bias_params": "in trainable biases"}
    extra = [f"{lora[k]:,} {label}" for k, label in labels.items() if lora[k]]
    if extra:
        print(f"  adapter     {lora['adapter_params']:,}" + "".join(f" + {e}" for e in extra))
    trainable = lora["trainable_params"]
    print(
        f"  trainable   {trainable:,} = {100 * trainable / total:.4f}% of {total:,} "
        f"(full fine-tuning trains {total / trainable:,.1f}x more)"
    )

    dtype, e = setup["dtype"], {"fp32": 4, "bf16": 2, "fp16": 2}[setup["dtype"]]
    w = max(10, len(low_bit))
    print(f"\nTraining memory (GiB = 2^30 bytes)   {'full FT':>10} {name:>{w}} {low_bit:>{w}}")
    rows = [
        ("weights", "weights"),
        ("fp32 master weights", "master_weights"),
        ("gradients", "gradients"),
        (f"optimizer state ({setup['optim']})", "optimizer"),
        ("= model states", "model_states"),
        ("activations (rough estimate*)", "activations"),
        ("= total", "total"),
    ]
    for label, key in rows:
        print(
            f"  {label:<34} {_gib(mem['full'][key]):>10} "
            + " ".join(f"{_gib(mem[m][key]):>{w}}" for m in ("lora", "qlora"))
        )

    q = res["qlora"]
    optim = {
        "adamw": "AdamW, two fp32 moments per trainable parameter (8 bytes)",
        "adamw8bit": "8-bit AdamW (bitsandbytes): two 1-byte states + an fp32 absmax per 256 values "
        "(fp32 states for tensors under 4096 values)",
        "sgd": "plain SGD without momentum: no state",
    }[setup["optim"]]
    master = (
        "no master copy needed (the weights are fp32)"
        if e == 4
        else "an fp32 master copy of every weight is counted (mixed precision)"
        if setup["master_weights"]
        else "no fp32 master copy (--no-master-weights)"
    )
    dq = "double quantization (8-bit constants, an fp32 one per 256 blocks: ~0.127 bits/param)"
    dq = dq if setup["double_quant"] else "fp32 block constants (0.5 bits/param; --no-double-quant)"
    act = (
        f"batch {setup['batch_size']} x {setup['seq_len']} tokens, gradient checkpointing "
        f"{'on' if setup['gradient_checkpointing'] else 'off'}, {dtype} activations; per token and layer "
        "6h + 2h_kv + 4i values (LLaMA-style decoder, SDPA/flash attention)"
        + (" + vocabulary logits" if lora["lm_head"] else "")
    )
    if res["activation_sizes"] is None:
        act = "not estimated: the config lacks hidden_size/num_hidden_layers/num_attention_heads/vocab_size"
    notes = [
        f"full FT: weights and gradients in {dtype}; {master}",
        f"{name}/{low_bit}: frozen base in {dtype}; adapter tensors, their gradients and optimizer states in fp32 "
        f"(lorakit's default, also on a 16-bit base); modules_to_save copies and trainable biases in {dtype}",
        f"{low_bit}: {q['quantized_params']:,} Linear weights in NF4 (4 bits, blocks of 64) with {dq}: "
        f"{_gib(q['quantized_bytes'])} GiB; the other {q['unquantized_params']:,} parameters (embeddings, norms, "
        f"biases, output head: transformers does not quantize them) in {dtype}",
        f"optimizer: {optim}",
        f"*activations: {act}; a formula, not a measurement (see lorakit.estimate.activation_bytes)",
        "not included: CUDA context and allocator overhead (~0.5-1 GiB), temporary buffers (4-bit dequantization, "
        "attention workspaces), the data batch",
    ]
    print("\nAssumptions")
    for note in notes:
        print(textwrap.fill(note, width=110, initial_indent="  - ", subsequent_indent="    "))


def print_quoted_figures(s: dict[str, Any]) -> None:
    gb = 1e9
    layer, nf4, counts, r = s["layer"], s["nf4"], s["counts"], s["r"]
    print(f"The figures usually quoted for LoRA and QLoRA, recomputed exactly (LLaMA-7B = preset llama-7b; r={r})\n")
    print("One 4096 x 4096 layer: r(d+k) instead of dk (LoRA paper §4.1), quoted as 65,536 vs 16,777,216")
    print_layer(layer)
    print(f"\nLoRA parameters of LLaMA-7B ({s['total']:,} parameters) at r={r}:")
    for label, n in counts.items():
        print(f"  {label:<28} {n:>12,}")
    seven = counts["q, k, v, o, gate, up, down"]
    ranks = s["ranks_in_quoted_range"]
    print(
        f'  "~4-8M" is often quoted for Q, K, V, O and the MLP: the exact count is {seven:,} ({seven / 1e6:.1f}M).\n'
        f"  4-8M fits q,v ({counts['q_proj, v_proj'] / 1e6:.2f}M) up to q,k,v,o ({counts['q, k, v, o'] / 1e6:.2f}M)"
        f" at r={r}" + (f", or all seven projections at r={' or '.join(map(str, ranks))}" if ranks else "") + "."
    )
    print(f"  Ratio: {s['total']:,} / {seven:,} = {s['ratio_all_seven']:.0f}x fewer (the quoted ~875x is 7B / 8M)")
    full, lora = s["fp32_full_model_states"], s["fp32_lora_model_states"]
    print("\nfp32 weights + gradients + AdamW (2 fp32 moments), activations excluded:")
    print(f"  full fine-tuning  {full / gb:6.1f} GB ({_gib(full)} GiB)   quoted: ~112 GB (7B x 16 bytes)")
    print(f"  LoRA (7 proj.)    {lora / gb:6.1f} GB ({_gib(lora)} GiB)   quoted: ~28.1 GB")
    print("\nQLoRA (paper §3): LLaMA-7B base weights in NF4 with double quantization (quoted: ~4 GB)")
    print(f"  {nf4['quantized_params']:,} Linear weights: {nf4['nf4_data_bytes'] / gb:.3f} GB of 4-bit data")
    print(f"    + {nf4['double_quant_constant_bytes'] / gb:.3f} GB of block constants (double quantization)")
    print(f"  embeddings, norms and output head in bf16: {nf4['bf16_rest_bytes'] / gb:.3f} GB")
    w = nf4["weights_bytes"]
    print(f"  = {w / gb:.2f} GB ({_gib(w)} GiB) of base weights")
    print(f"  (without double quantization: {nf4['weights_bytes_no_double_quant'] / gb:.2f} GB)")
    states = nf4["qlora_model_states_bytes"]
    print(f"  + the r={r} adapter (fp32 weights, gradients, AdamW) = {states / gb:.2f} GB ({_gib(states)} GiB);")
    print("  activations and CUDA overhead come on top (`lorakit estimate llama-7b` estimates the activations).")
