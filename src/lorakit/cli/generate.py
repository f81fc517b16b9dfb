"""``lorakit generate``: prompt in, completion out, with or without an adapter; ``--chat`` is interactive."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """\
examples:
  lorakit generate --prompt "Convert to ISO 8601 (YYYY-MM-DD): March 5, 2021"
  lorakit generate --adapter runs/dates --prompt "Convert to ISO 8601 (YYYY-MM-DD): 5th of May 1999"
  echo "Write a haiku about rank." | lorakit generate --prompt -
  lorakit generate --adapter runs/dates --chat          # interactive; /reset clears history, /quit leaves
  lorakit generate --raw --prompt "Once upon a time" --max-new-tokens 40 --temperature 0.8

  # several adapters on one base, each prompt of a JSONL file with its own (one batch mixes them)
  lorakit generate --adapter dates=runs/dates --adapter sql=runs/sql --batch prompts.jsonl --output out.jsonl

A --batch file holds one JSON object per line: {"prompt": "...", "adapter": "sql"}; "adapter" is optional
(default: the first --adapter; "__base__" for none). Each output line repeats the input with "completion" added.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a model, with or without an adapter",
        description="Generate a completion. The chat template is applied unless --raw.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="model folder or cached hub id (default: the adapter's base, or SmolLM2)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="[NAME=]FOLDER",
        help="adapter folder (lorakit or PEFT format), repeatable as NAME=FOLDER; omit for the base model",
    )
    p.add_argument("--use", default=None, help="with several adapters: the one --prompt/--chat uses (the first)")
    p.add_argument("--prompt", default=None, help="the prompt; '-' reads it from stdin")
    p.add_argument("--batch", default=None, help="JSONL file of prompts, each may name its adapter (see below)")
    p.add_argument("--batch-size", type=int, default=16, help="rows generated together with --batch (16)")
    p.add_argument("--output", "-o", default=None, help="with --batch: write the JSONL here (default: stdout)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text as is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run)


def base_model_for(model_name: str | None, adapter: str | None) -> str | None:
    """``--model`` if given; else the base model the adapter records (``base_model_name_or_path``); else the default."""
    if model_name is not None or adapter is None:
        return model_name
    from lorakit.tuners.lora import LoraConfig

    return LoraConfig.from_pretrained(adapter).base_model_name_or_path


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """``--adapter`` values (``FOLDER`` or ``NAME=FOLDER``) as {name: folder}; a lone unnamed one is "default"."""
    from pathlib import Path

    from lorakit.errors import ConfigError

    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = ("default" if len(specs or []) == 1 else Path(spec).name), spec
        if not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: expected FOLDER or NAME=FOLDER")
        if name in out:
            raise ConfigError(f"--adapter name {name!r} is given twice; name each adapter once (NAME=FOLDER)")
        out[name] = folder
    return out


def load_for_inference(
    model_name: str | None, adapter: str | dict[str, str] | None, device: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device``; with the adapter(s) loaded (unmerged) when given: one
    folder, or {name: folder} for several on the same base (the first is active)."""
    import torch

    from lorakit.hub import load_model
    from lorakit.model import PeftModel

    adapters = {"default": adapter} if isinstance(adapter, str) else dict(adapter or {})
    first = next(iter(adapters.items()), None)
    model, tokenizer = load_model(base_model_for(model_name, first[1] if first else None))
    if first is not None:
        model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
        for name, folder in list(adapters.items())[1:]:
            model.load_adapter(folder, adapter_name=name)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    return model.to(dev).eval(), tokenizer


def complete(model: Any, tokenizer: Any, messages_or_text: Any, args: argparse.Namespace) -> str:
    import torch

    if isinstance(messages_or_text, str):
        enc = tokenizer(messages_or_text, return_tensors="pt")
    else:
        text = tokenizer.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    sample = args.temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _messages(args: argparse.Namespace, history: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, *history, {"role": "user", "content": text}]


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.errors import ConfigError

    if sum((args.chat, args.prompt is not None, args.batch is not None)) != 1:
        raise ConfigError("give exactly one of --prompt TEXT (or '-' for stdin), --chat and --batch FILE")
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.batch_size <= 0:
        raise ConfigError("--max-new-tokens and --batch-size must be > 0, --temperature >= 0, --top-p in (0, 1]")
    adapters = parse_adapters(args.adapter)
    if args.use is not None and args.use not in adapters:
        raise ConfigError(f"--use {args.use!r} names no --adapter; given: {sorted(adapters)}")
    rows = read_batch(args.batch, adapters, args.use) if args.batch else None
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(args.model, adapters, args.device)
    if args.use is not None:
        model.set_adapter(args.use)
    if rows is not None:
        return generate_batch(model, tokenizer, rows, args)
    if not args.chat:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        source = prompt if args.raw else _messages(args, [], prompt)
        print(complete(model, tokenizer, source, args))
        return 0
    history: list[dict[str, str]] = []
    print("chat: /reset clears the history, /quit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        reply = complete(model, tokenizer, _messages(args, history, text), args)
        print(f"model> {reply}")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def read_batch(path: str, adapters: dict[str, str], default: str | None) -> list[dict[str, Any]]:
    """The rows of a --batch file, each with its "adapter" filled in and checked (line numbers in errors)."""
    import json
    from pathlib import Path

    from lorakit.errors import DataError
    from lorakit.layers.routing import BASE_ROW

    fallback = default or next(iter(adapters), BASE_ROW)
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"--batch {path}: cannot read it: {exc.strerror or exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"--batch {path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f'--batch {path}, line {number}: expected an object with a "prompt" string')
        row.setdefault("adapter", fallback)
        if row["adapter"] != BASE_ROW and row["adapter"] not in adapters:
            known = sorted(adapters) + [BASE_ROW]
            raise DataError(f"--batch {path}, line {number}: adapter {row['adapter']!r} is not loaded; known: {known}")
        rows.append(row)
    if not rows:
        raise DataError(f"--batch {path}: no prompts in it")
    return rows


def generate_batch(model: Any, tokenizer: Any, rows: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """Generate every row, ``--batch-size`` at a time, each through its own adapter in one mixed batch."""
    import json

    import torch

    from lorakit.io import atomic_write_bytes

    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    sample = args.temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    mixed = hasattr(model, "peft_config")
    lines = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        texts = [
            r["prompt"]
            if args.raw
            else tokenizer.apply_chat_template(
                _messages(args, [], r["prompt"]), tokenize=False, add_generation_prompt=True
            )
            for r in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=args.raw)
        enc = {k: v.to(device) for k, v in enc.items()}
        extra = {"adapter_names": [r["adapter"] for r in chunk]} if mixed else {}
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs, **extra)
        for row, tokens in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            lines.append(json.dumps({**row, "completion": tokenizer.decode(tokens, skip_special_tokens=True).strip()}))
    text = "\n".join(lines) + "\n"
    if args.output:
        atomic_write_bytes(args.output, text.encode())
        print(f"{len(rows)} completions written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
