"""``lorakit merge``: base model + adapter -> a full model folder that plain transformers loads."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """\
examples:
  lorakit merge --adapter runs/dates --output merged/dates
  lorakit merge --model path/to/base --adapter runs/mine --output merged/mine --dtype bf16

  # a QLoRA adapter onto the 4-bit base it was trained on: dequantized NF4 weights + ΔW, saved in bf16
  lorakit merge --adapter runs/qlora --bits 4 --output merged/qlora --dtype bf16

  # the same, then quantized again to NF4 for serving: prints the logit drift the requantization causes
  lorakit merge --adapter runs/qlora --bits 4 --requantize 4 --output merged/qlora-nf4 --dtype bf16

Then, with no lorakit at all:
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/dates')"

The merged folder holds the model (safetensors), its config and the tokenizer. Before writing, the merged
model's logits are compared with the unmerged adapter's on a probe prompt and the difference is printed
(--no-verify skips it). The folder is written to a temporary sibling and renamed into place: an existing
folder is replaced only when --overwrite is given and the new one is complete.

Merging never requantizes on its own: W + ΔW is written in --dtype. --requantize 4|8 asks for it; the model
is then saved pre-quantized (bitsandbytes layers and their constants, with a quantization_config that plain
transformers + bitsandbytes load), and the drift it causes is printed: logits of the requantized model against
the merged model before requantization and against the unmerged adapter (max and mean |diff|, and how often
the most likely next token stays the same).
"""

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers model",
        description="W' = W + s·BA for every adapted layer; the result has no adapter layers and no extra latency.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="base model folder or cached hub id (default: the adapter's base)")
    p.add_argument("--adapter", required=True, help="adapter folder (lorakit or PEFT format)")
    p.add_argument("--output", "-o", required=True, help="folder for the merged model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights (fp32)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[4, 8],
        default=None,
        help="quantize the base as in training (lorakit train --qlora / --bits) before merging, so the adapter "
        "meets the weights it was trained on; the result is dequantized, never requantized",
    )
    p.add_argument(
        "--requantize",
        type=int,
        choices=[4, 8],
        default=None,
        help="quantize the merged model again to 4 or 8 bits and save it so; prints the logit drift this causes",
    )
    p.add_argument(
        "--quant-type",
        dest="quant_type",
        choices=["nf4", "fp4"],
        default="nf4",
        help="4-bit code (--bits/--requantize 4)",
    )
    p.add_argument(
        "--no-double-quant", dest="double_quant", action="store_false", help="with --bits 4 / --requantize 4"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the logits check")
    p.add_argument("--probe", default="The quick brown fox jumps over the lazy dog.", help="text for the check")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from lorakit.cli.generate import base_model_for
    from lorakit.hub import load_model
    from lorakit.io import atomic_write_dir, check_output_apart
    from lorakit.model import PeftModel

    out = Path(args.output).expanduser()
    base_spec = base_model_for(args.model, args.adapter)
    check_output_apart(out, {"--adapter": args.adapter, "base model": base_spec}, "--output")
    check_replaceable(out, args.overwrite)
    base, tokenizer = load_model(base_spec)
    if args.bits is not None:
        from lorakit.kbit import quantize

        quantize(base, bits=args.bits, quant_type=args.quant_type, double_quant=args.double_quant)
    model = PeftModel.from_pretrained(base, args.adapter)
    probe = tokenizer(args.probe, return_tensors="pt")
    model.eval()
    check = args.verify or args.requantize is not None
    with torch.inference_mode():
        unmerged = model(**probe).logits.float() if check else None
    merged = model.merge_and_unload(dequantize_dtype=torch.float32).eval()
    if args.verify:
        with torch.inference_mode():
            diff = (merged(**probe).logits - unmerged).abs().max().item()
        scale = unmerged.abs().max().item()
        print(f"merged vs unmerged logits on the probe: max |diff| = {diff:.3e} (max |logit| {scale:.1f})")
    dtype = getattr(torch, DTYPES[args.dtype])
    merged = merged.to(dtype)
    n = sum(p.numel() for p in merged.parameters())  # before any requantization packs two weights per byte
    if args.requantize is not None:
        from lorakit.kbit import quantize

        with torch.inference_mode():
            before = merged(**probe).logits.float()
        quantize(merged, bits=args.requantize, quant_type=args.quant_type, double_quant=args.double_quant)
        with torch.inference_mode():
            after = merged(**probe).logits.float()
        what = f"{args.requantize}-bit" + (f" {args.quant_type}" if args.requantize == 4 else "")
        print(f"requantized to {what}: drift of the logits on the probe ({after.shape[1]} positions)")
        print(f"  vs the merged {args.dtype} model:   {describe_drift(before, after)}")
        print(f"  vs the unmerged adapter model: {describe_drift(unmerged, after)}")

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "lorakit merge", "files": written}, indent=2) + "\n")

    atomic_write_dir(out, fill)
    form = f"{args.dtype}" + (f", linear layers in {args.requantize} bit" if args.requantize else "")
    print(f"merged model ({n:,} parameters, {form}) written to {out}")
    return 0


#: The list of files ``lorakit merge`` wrote into its output: ``--overwrite`` replaces only such a folder.
MANIFEST = ".lorakit-merge.json"


def check_replaceable(out: Any, overwrite: bool) -> None:
    """Refuse to replace ``out`` unless asked, and then only if it holds nothing but an earlier merge's files.

    Raises:
        AdapterFileError: ``out`` is a file, holds files without ``--overwrite``, or holds files that no
            ``lorakit merge`` wrote (listed), which replacing the folder would delete.
    """
    import json

    from lorakit.errors import AdapterFileError

    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"--output {out} is a file; give a folder")
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise AdapterFileError(f"--output {out} exists and is not empty; pass --overwrite to replace it")
    try:
        ours = set(json.loads((out / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    foreign = [f for f in present if f not in ours]
    if foreign:
        raise AdapterFileError(
            f"--output {out} holds files that lorakit merge did not write ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); --overwrite replaces only an earlier merge's folder, so "
            "choose another --output or move those files"
        )


def logit_drift(reference: Any, logits: Any) -> dict[str, float]:
    """How far ``logits`` moved from ``reference`` (both ``(batch, seq, vocab)``): max and mean |diff|, and the
    share of positions whose most likely next token is unchanged."""
    diff = (logits.float() - reference.float()).abs()
    same = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agreement": same.item()}


def describe_drift(reference: Any, logits: Any) -> str:
    d = logit_drift(reference, logits)
    return (
        f"max |diff| {d['max_abs']:.3f}, mean |diff| {d['mean_abs']:.4f}, "
        f"same top-1 token at {d['top1_agreement']:.0%} of positions"
    )
