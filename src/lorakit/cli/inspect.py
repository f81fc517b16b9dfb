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
    from lorakit.tuners.lora.param_names import parameter_ranks, strip_wrappers

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
    marker = config.FILE_PREFIX
    for key, (shape, _) in shapes.items():
        parts = key.split(".")
        at = next((i for i, part in enumerate(parts) if marker and part.startswith(marker)), None)
        if at is None:  # not one of the method's tensors (a trained head copy, a bias)
            others[key] = shape
            continue
        name = ".".join(parts[:at]).removeprefix("base_model.model.") or "(model input)"  # a prompt: no module
        entry = modules.setdefault(name, {"params": 0, "rank": None})
        entry["params"] += int(torch.Size(shape).numel())
        rank = config.rank_of(parts[at], shape)
        if rank is not None and not parameter_ranks(config, name):  # a parameter's factors: r rows per expert
            entry["rank"] = rank

    by_type: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "ranks": set(), "layers": set()})
    for name, entry in modules.items():
        t = by_type[strip_wrappers(name).rsplit(".", 1)[-1]]  # nested target_parameters layers: their module
        t["count"] += 1
        t["ranks"].add(entry["rank"])
        layer = _LAYER.findall(name)
        if layer:
            t["layers"].add(int(layer[-1]))
    targets = getattr(config, "target_modules", None)
    return {
        "folder": str(folder),
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "method": config.NAME,
        "summary": config.summary(),
        "task_type": str(getattr(config.task_type, "value", config.task_type)),
        "base_model": config.base_model_name_or_path,
        "config": json.loads(config.to_json()),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "target_parameters": getattr(config, "target_parameters", None),
        "modules_adapted": len(modules),
        "modules": modules,
        "by_module": {
            k: {
                "count": v["count"],
                "ranks": sorted(x for x in v["ranks"] if x is not None),
                "layers": _span(v["layers"]),
            }
            for k, v in sorted(by_type.items())
        },
        "adapter_parameters": sum(e["params"] for e in modules.values()),
        "other_tensors": {k: v for k, v in sorted(others.items())},
        "other_parameters": sum(int(torch.Size(s).numel()) for s in others.values()),
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
    print(f"method       {info['summary']}")
    in_model = [name for name in info["by_module"] if name != "(model input)"]  # a prompt is before the model
    if in_model:
        targets = info["target_modules"] if info["target_modules"] is not None else "(placed by the method)"
        print(f"targets      {targets}  -> {info['modules_adapted']} modules")
        if info["target_parameters"]:
            print(f"             + target_parameters {info['target_parameters']} (r per expert: E*r rows in lora_A)")
    for name in in_model:
        t = info["by_module"][name]
        ranks = f"rank {','.join(map(str, t['ranks']))}   " if t["ranks"] else ""
        print(f"  {name:<24} x{t['count']:<4} {ranks}layers {t['layers']}")
    parts = [f"{info['adapter_parameters']:,} in the adapter's tensors"] if info["modules_adapted"] else []
    if info["other_tensors"]:
        shown = ", ".join(list(info["other_tensors"])[:3]) + (", ..." if len(info["other_tensors"]) > 3 else "")
        parts.append(f"{info['other_parameters']:,} in {len(info['other_tensors'])} other tensors ({shown})")
    print(f"parameters   {' + '.join(parts) or 'none'}")
    print(f"file         {info['weights_file']}: {info['file_bytes'] / 2**20:.2f} MiB ({', '.join(info['dtypes'])})")
    if info["other_adapters"]:
        print(f"also holds   adapters {info['other_adapters']} (subfolders)")
    return 0
