"""``lorakit inspect``: what an adapter folder holds, read from its files alone (no base model is loaded)."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  lorakit inspect runs/dates
  lorakit inspect path/to/peft-adapter --json
"""

_LAYER = re.compile(r"\.(\d+)\.")
_FACTOR = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?\.weight$"
    r"|\.(lora_embedding_[AB]|lora_magnitude_vector|lora_A|lora_B|lora_E)$"  # bare tensors: DoRA, AdaLoRA
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show an adapter's targets, ranks, parameter count, size and base model",
        description="Summarise an adapter folder (lorakit or PEFT format) from its config and weights header.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _shapes(file: Path) -> dict[str, tuple[list[int], str]]:
    from safetensors import safe_open

    from lorakit.errors import AdapterFileError

    try:
        with safe_open(os.fspath(file), framework="pt") as fh:
            return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except Exception as exc:
        raise AdapterFileError(f"{file} is not a readable safetensors file: {exc}") from exc


def summarize(folder: str | os.PathLike) -> dict[str, Any]:
    """The facts ``lorakit inspect`` prints, as a dict."""
    import torch

    from lorakit.config import PeftConfig
    from lorakit.errors import AdapterFileError
    from lorakit.persistence import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter_weights

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterFileError(f"{folder} is not a folder; give an adapter folder (it holds adapter_config.json)")
    config = PeftConfig.from_pretrained(folder)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        shapes = _shapes(weights)
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        weights = folder / LEGACY_WEIGHTS_NAME
        state = read_adapter_weights(folder)  # torch.load(weights_only=True); refusals as AdapterFileError
        shapes = {k: (list(v.shape), str(v.dtype)) for k, v in state.items()}
    else:
        raise AdapterFileError(f"no weights file in {folder}: expected {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME}")

    modules: dict[str, dict[str, Any]] = {}
    others: dict[str, list[int]] = {}
    for key, (shape, _) in shapes.items():
        m = _FACTOR.search(key)
        if not m:
            others[key] = shape
            continue
        name = key[: m.start()].removeprefix("base_model.model.")
        factor = m.group(1) or m.group(3)
        entry = modules.setdefault(name, {"params": 0})
        entry["params"] += int(torch.Size(shape).numel())
        if factor == "lora_A":
            entry["r"] = shape[0]
        elif factor == "lora_embedding_A":
            entry["r"] = shape[0]

    by_type: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "ranks": set(), "layers": set()})
    for name, entry in modules.items():
        suffix = name.rsplit(".", 1)[-1]
        t = by_type[suffix]
        t["count"] += 1
        t["ranks"].add(entry.get("r"))
        layer = _LAYER.findall(name)
        if layer:
            t["layers"].add(int(layer[-1]))
    adapter_params = sum(e["params"] for e in modules.values())
    other_params = sum(int(torch.Size(s).numel()) for s in others.values())
    adalora = getattr(config, "init_r", None) is not None
    return {
        "folder": str(folder),
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "task_type": str(getattr(config.task_type, "value", config.task_type)),
        "base_model": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_dora": config.use_dora,
        "rank_pattern": (config.kept_ranks if adalora else config.rank_pattern) or {},
        "adalora": {"init_r": config.init_r, "target_r": config.target_r, "total_step": config.total_step}
        if adalora
        else None,
        "target_modules": sorted(config.target_modules)
        if isinstance(config.target_modules, (set, list, tuple))
        else config.target_modules,
        "modules_adapted": len(modules),
        "by_module": {
            k: {
                "count": v["count"],
                "ranks": sorted(x for x in v["ranks"] if x is not None),
                "layers": _span(v["layers"]),
            }
            for k, v in sorted(by_type.items())
        },
        "adapter_parameters": adapter_params,
        "other_tensors": {k: v for k, v in sorted(others.items())},
        "other_parameters": other_params,
        "dtypes": sorted({d for _, d in shapes.values()}),
        "weights_file": weights.name,
        "file_bytes": weights.stat().st_size,
        "other_adapters": sorted(p.name for p in folder.iterdir() if (p / "adapter_config.json").is_file()),
    }


def _span(layers: set[int]) -> str:
    if not layers:
        return "-"
    lo, hi = min(layers), max(layers)
    return f"{lo}-{hi}" if len(layers) == hi - lo + 1 else ",".join(map(str, sorted(layers)))


def run(args: argparse.Namespace) -> int:
    info = summarize(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter      {info['folder']}")
    print(f"type         {info['peft_type']} ({info['task_type']})   base model: {info['base_model']}")
    ada = info["adalora"]
    if ada:
        kept = info["rank_pattern"]
        ranks = f"{sum(kept.values())} of {ada['init_r'] * len(kept)} triplets kept" if kept else "not cut yet"
        scaling = info["lora_alpha"] / (ada["init_r"] + 1e-5)
        print(
            f"rank         AdaLoRA init_r={ada['init_r']} -> target_r={ada['target_r']} on average: {ranks}  "
            f"lora_alpha={info['lora_alpha']}  scaling={scaling:.4g}"
        )
    else:
        method = "DoRA (magnitude + direction)" if info["use_dora"] else "LoRA"
        scaling = info["lora_alpha"] / info["r"]
        print(f"rank         r={info['r']}  lora_alpha={info['lora_alpha']}  scaling={scaling:g}  {method}")
        if info["rank_pattern"]:
            print(f"rank_pattern {info['rank_pattern']}")
    print(f"targets      {info['target_modules']}  -> {info['modules_adapted']} modules")
    for name, t in info["by_module"].items():
        print(f"  {name:<24} x{t['count']:<4} rank {','.join(map(str, t['ranks']))}   layers {t['layers']}")
    held = "LoRA factors and DoRA magnitudes" if info["use_dora"] else "LoRA factors"
    held = "AdaLoRA triplets (A, E, B)" if ada else held
    print(f"parameters   {info['adapter_parameters']:,} in {held}", end="")
    print(
        f" + {info['other_parameters']:,} in {len(info['other_tensors'])} other tensors"
        if info["other_tensors"]
        else ""
    )
    print(f"file         {info['weights_file']}: {info['file_bytes'] / 2**20:.2f} MiB ({', '.join(info['dtypes'])})")
    if info["other_adapters"]:
        print(f"also holds   adapters {info['other_adapters']} (subfolders)")
    return 0
