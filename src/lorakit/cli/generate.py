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
    p.add_argument("--adapter", default=None, help="adapter folder (lorakit or PEFT format); omit for the base model")
    p.add_argument("--prompt", default=None, help="the prompt; '-' reads it from stdin")
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
    from lorakit.config import LoraConfig

    return LoraConfig.from_pretrained(adapter).base_model_name_or_path


def load_for_inference(model_name: str | None, adapter: str | None, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device``; with the adapter loaded (unmerged) when given."""
    import torch

    from lorakit.hub import load_model
    from lorakit.model import PeftModel

    model, tokenizer = load_model(base_model_for(model_name, adapter))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
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

    if args.chat == (args.prompt is not None):
        raise ConfigError("give exactly one of --prompt TEXT (or '-' for stdin) and --chat")
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be > 0, --temperature >= 0, --top-p in (0, 1]")
    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.device)
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
