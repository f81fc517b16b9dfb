"""``lorakit train``: fine-tune a causal LM with LoRA on prompt/completion or chat data."""

from __future__ import annotations

import argparse
import re
import signal
from typing import Any

EXAMPLES = """\
examples:
  # the demo: SmolLM2-135M-Instruct learns the bundled dates -> ISO 8601 task (a few minutes on 2 CPU cores)
  lorakit train --output runs/dates

  # your data (JSONL/JSON/CSV/parquet with prompt/completion or chat messages), all linear layers, r=16
  lorakit train --data train.jsonl --eval-data eval.jsonl --targets all-linear --r 16 --alpha 32 -o runs/mine

  # DoRA instead of plain LoRA (same flags otherwise; the adapter loads in PEFT with use_dora=True)
  lorakit train --dora --output runs/dora

  # QLoRA: the base in 4-bit NF4 with double quantization, 8-bit optimizer state (needs bitsandbytes)
  lorakit train --qlora --optim adamw8bit --output runs/qlora

  # AdaLoRA: ranks start at 12 and are cut to 8 on average where they matter least; a rank heatmap is saved
  lorakit train --method adalora --r 8 --init-r 12 --output runs/adalora

  # QLoRA with a LoftQ start: A, B fitted to what quantization lost, so training starts nearer the fp32 model
  lorakit train --qlora --loftq --output runs/loftq

  # PiSSA: A, B start at the top-r singular directions of each weight; saved as plain LoRA (rank 2r) for the base
  lorakit train --init pissa --output runs/pissa

  # settings from a YAML file; flags override it
  lorakit train --config run.yaml --lr 5e-4

  # continue an interrupted run (Ctrl-C or SIGTERM writes a checkpoint) to the same result
  lorakit train --output runs/dates --resume

  # two processes (DDP; gloo on CPU, nccl on GPUs): the same adapter as one process at the same global batch
  torchrun --nproc_per_node 2 -m lorakit train --batch-size 4 --output runs/ddp

  # bf16 base weights and autocast (adapters stay fp32); on GPUs, fp16 with loss scaling also works
  lorakit train --dtype bf16 --output runs/bf16

  # FSDP2: base and adapters sharded across the processes; the saved adapter is the usual (whole) one
  torchrun --nproc_per_node 2 -m lorakit train --fsdp --dtype bf16 --batch-size 4 --output runs/fsdp

The global batch per optimizer step is batch-size x grad-accum x number of processes.
Writes into --output: adapter_config.json + adapter_model.safetensors (PEFT format), metrics.json, loss.png,
checkpoints/step-N/ (adapter, optimizer, scheduler and RNG state, in JSON and safetensors). An --output
already holding those is refused unless --overwrite (which replaces only them) or --resume; one that is or
holds the model or data is refused, and so is a second run writing into the same --output at the same time.
A run whose loss or weights become NaN/Inf stops with an error and saves nothing from that step.
"""

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def add_parser(sub: Any) -> None:
    from lorakit.training.methods import METHODS, TRAIN_METHODS
    from lorakit.training.starts import INITS

    p = sub.add_parser(
        "train",
        help="fine-tune a model with LoRA (or another method: --method)",
        description="Fine-tune a causal language model with LoRA. The loss covers completion tokens only.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    S = argparse.SUPPRESS  # a flag not given leaves the YAML file's or the built-in value in place
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="model folder or cached hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=S, help="training data file, or 'dates' (the bundled task; the default)")
    g.add_argument("--eval-data", dest="eval_data", default=S, help="held-out file for exact-match eval")
    g.add_argument("--output", "-o", default=S, help="output folder (default: lorakit-output)")
    g.add_argument("--config", default=None, help="YAML file of settings (same names as the flags)")
    g.add_argument("--max-length", dest="max_length", type=int, default=S, help="max tokens per example (64)")
    g.add_argument("--overflow", choices=["truncate", "drop"], default=S, help="longer examples (truncate)")
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--method",
        choices=METHODS,
        default=S,
        help="; ".join(m.help for m in TRAIN_METHODS.values()) + "; full (every weight trains: the baseline)",
    )
    g.add_argument("--r", "--rank", dest="r", type=int, default=S, help="rank (8); spell it --rank after torchrun")
    g.add_argument("--alpha", dest="lora_alpha", type=float, default=S, help="lora_alpha; scaling = alpha/r (16)")
    g.add_argument("--dropout", dest="lora_dropout", type=float, default=S, help="dropout on the adapter input (0)")
    g.add_argument(
        "--dora",
        dest="use_dora",
        action="store_true",
        default=S,
        help="DoRA: LoRA plus a trainable magnitude per output feature (arXiv 2402.09353)",
    )
    g.add_argument(
        "--lora-bias",
        dest="lora_bias",
        action="store_true",
        default=S,
        help="a trainable bias on each B factor (PEFT's lora_bias), merged into the base layer's bias",
    )
    g.add_argument(
        "--qlora",
        dest="bits",
        action="store_const",
        const=4,
        default=S,
        help="QLoRA: quantize the base model to 4-bit NF4 with double quantization (bitsandbytes)",
    )
    g.add_argument("--bits", type=int, choices=[4, 8], default=S, help="quantize the base to 4 or 8 bits")
    g.add_argument("--quant-type", dest="quant_type", choices=["nf4", "fp4"], default=S, help="4-bit code (nf4)")
    g.add_argument(
        "--no-double-quant", dest="double_quant", action="store_false", default=S, help="4-bit without double quant"
    )
    g.add_argument(
        "--virtual-tokens",
        dest="num_virtual_tokens",
        type=int,
        default=S,
        help="prompt, prefix and P-tuning: virtual tokens (20)",
    )
    g.add_argument(
        "--prompt-init-text",
        dest="prompt_init_text",
        default=S,
        help="prompt tuning: start from this text's token embeddings (default: embeddings of sampled vocabulary)",
    )
    g.add_argument(
        "--reduction-factor",
        dest="reduction_factor",
        type=int,
        default=S,
        help="bottleneck adapters: hidden size / bottleneck size (16)",
    )
    g.add_argument("--init-r", dest="init_r", type=int, default=S, help="AdaLoRA: starting rank (1.5 x r)")
    g.add_argument("--tinit", type=int, default=S, help="AdaLoRA: warm-up steps before cutting ranks (10%% of the run)")
    g.add_argument("--tfinal", type=int, default=S, help="AdaLoRA: final steps at the kept ranks (20%% of the run)")
    g.add_argument(
        "--orth-reg-weight", dest="orth_reg_weight", type=float, default=S, help="AdaLoRA: orthogonality penalty (0.5)"
    )
    g.add_argument(
        "--loftq",
        action="store_true",
        default=S,
        help="with --qlora: initialise A, B by LoftQ (one iteration) so that Q + s·BA ≈ W (arXiv 2310.08659)",
    )
    g.add_argument(
        "--init",
        "--init-lora-weights",
        dest="init_lora_weights",
        metavar="START",
        default=S,
        help="how A and B start: "
        + "; ".join(f"{k}: {v}" for k, v in INITS.items())
        + "; pissa_niter_K: PiSSA by a randomized SVD with K iterations. pissa/olora train on the residual "
        "W - s·B0A0 and the adapter is saved converted to plain LoRA of rank 2r for the original base (default: "
        "default)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        default=S,
        help="recompute activations in backward (less memory, more time)",
    )
    g.add_argument(
        "--targets",
        dest="target_modules",
        nargs="+",
        default=S,
        help="module names (q_proj v_proj ... or comma-separated), a regex, or all-linear "
        "(default: q,k,v,o,gate,up,down projections)",
    )
    g.add_argument(
        "--target-parameters",
        dest="target_parameters",
        metavar="NAME",
        nargs="+",
        default=S,
        help="also LoRA on these nn.Parameters (or comma-separated), e.g. mlp.experts.gate_up_proj "
        "mlp.experts.down_proj: the fused experts of MoE models; rank r per expert (lora only)",
    )
    g.add_argument(
        "--trainable-token-indices",
        dest="trainable_token_indices",
        metavar="ID",
        type=int,
        nargs="+",
        default=S,
        help="also train these rows of the input embedding (e.g. the ids of special tokens added to the "
        "tokenizer); only those rows are saved (lora only)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", dest="learning_rate", type=float, default=S, help="peak learning rate (1e-3)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, help="AdamW weight decay (0)")
    g.add_argument(
        "--loraplus-ratio",
        dest="loraplus_ratio",
        type=float,
        default=S,
        help="LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B factors learn at lr x this ratio (the paper uses 16; "
        "lora and adalora only; default: one lr)",
    )
    g.add_argument(
        "--optim",
        choices=["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"],
        default=S,
        help="optimizer: torch AdamW (default) or bitsandbytes' 8-bit / paged AdamW",
    )
    g.add_argument("--epochs", type=float, default=S, help="passes over the data (1)")
    g.add_argument("--max-steps", dest="max_steps", type=int, default=S, help="optimizer steps; overrides --epochs")
    g.add_argument(
        "--batch-size", dest="batch_size", type=int, default=S, help="examples per process per micro-batch (8)"
    )
    g.add_argument("--grad-accum", dest="grad_accum", type=int, default=S, help="micro-batches per step (1)")
    g.add_argument(
        "--scheduler", choices=["linear", "cosine", "constant", "constant_with_warmup"], default=S, help="(cosine)"
    )
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=S, help="(0)")
    g.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=S, help="gradient clipping (1.0)")
    g.add_argument("--seed", type=int, default=S, help="(0)")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N (auto)")
    g.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=S,
        help="the frozen base's dtype; bf16/fp16 also run the forward under autocast, adapters stay fp32 "
        "(fp32; fp16 on CUDA only, with loss scaling)",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=S,
        help="under torchrun: shard the base and the adapters across processes (FSDP2 fully_shard) instead of DDP",
    )
    g.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        default=S,
        help="on CPU, let glibc hand freed memory back between steps (default: keep it; steps ~0.8x as long)",
    )
    g = p.add_argument_group("checkpoints and eval")
    g.add_argument("--save-every", dest="save_every", type=int, default=S, help="checkpoint every N steps (50)")
    g.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, default=S, help="newest kept (2)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=S,
        help="continue from the newest checkpoint in --output, or from the checkpoint folder given",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=S,
        help="replace what an earlier run wrote into --output (its adapter, metrics, plot, checkpoints; nothing else)",
    )
    g.add_argument("--eval-limit", dest="eval_limit", type=int, default=S, help="eval rows used (100)")
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=S, help="eval generation length (16)")
    g.add_argument("--samples", type=int, default=S, help="sample generations printed (4)")
    g.add_argument("--skip-eval", dest="skip_eval", action="store_true", default=S, help="no before/after eval")
    g.add_argument(
        "--no-eval-before", dest="eval_before", action="store_false", default=S, help="evaluate after training only"
    )
    g.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def parse_targets(values: list[str]) -> list[str] | str:
    """``["q_proj", "v_proj"]`` / ``["q_proj,v_proj"]`` -> list; ``["all-linear"]`` or one regex -> str."""
    items = [v for value in values for v in value.split(",") if v]
    if len(items) == 1 and (items[0] == "all-linear" or _REGEX_CHARS.search(items[0])):
        return items[0]
    return items


def run(args: argparse.Namespace) -> int:
    from lorakit.training.config import TrainConfig
    from lorakit.training.trainer import train

    overrides = {
        k: v for k, v in vars(args).items() if k not in ("command", "run", "config", "no_progress") and v is not None
    }
    if "target_modules" in overrides:
        overrides["target_modules"] = parse_targets(overrides["target_modules"])
    if "target_parameters" in overrides:
        overrides["target_parameters"] = [n for v in overrides["target_parameters"] for n in v.split(",") if n]
    cfg = TrainConfig.from_sources(args.config, overrides)
    if args.no_progress:  # no bar at all: transformers' own ("Loading weights") too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = train(cfg, progress=not args.no_progress)
    if result.interrupted:  # the shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM)
        return 128 + int(result.stop_signal or signal.SIGINT)
    return 0
