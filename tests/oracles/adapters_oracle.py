"""The adapters library (AdapterHub, adapters 1.3.0) as the oracle for lorakit's bottleneck adapters.

Runs in its own virtualenv (``make oracle-venv``: transformers 4.57, which the adapters library pins; lorakit's
own is transformers 5), started by tests/test_bottleneck_oracle.py as ``python adapters_oracle.py spec.json``.
For each case of the spec it loads a saved base model, adds bottleneck adapters with random (non-identity)
weights, runs fixed input ids through the active setup, and saves each adapter with ``save_adapter``; all the
outputs go into one safetensors file. Nothing here imports lorakit.

Spec (JSON)::

    {"ids": "ids.safetensors", "out": "outputs.safetensors", "cases": [
        {"id": "llama-pfeiffer", "base": "<model folder>", "active": ["a"],
         "adapters": [{"name": "a", "config": "SeqBnConfig", "overrides": {}, "seed": 1, "save": "<folder>",
                       "pickle": false}]}]}

``active`` lists the adapters run (more than one: ``Stack``). With ``pickle`` the adapter is saved the library's
default way (``pytorch_adapter.bin``); otherwise as safetensors (``adapter.safetensors``). The library cannot
write adapters with ``ln_before`` as safetensors (two names share one LayerNorm), so those tensors are written
here as the library's state dict with each name given its own copy.
"""

from __future__ import annotations

import json
import os
import sys

import adapters
import torch
import transformers
from adapters.composition import Stack
from safetensors.torch import load_file, save_file


def load_base(folder: str) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder)
    return model.eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, name: str, seed: int) -> None:
    """Random weights far from the identity start for every tensor of adapter ``name`` (LayerNorm weights and
    learned scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    for key, param in model.named_parameters():
        if f".adapters.{name}." not in key:
            continue
        noise = 0.2 * torch.randn(param.shape, generator=gen)
        layer_norm_weight = key.endswith(".weight") and param.dim() == 1  # a Linear's weight is 2-D
        param.copy_(1.0 + noise if layer_norm_weight or key.endswith(".scaling") else noise)


def save(model: torch.nn.Module, name: str, folder: str, pickle: bool) -> None:
    os.makedirs(os.path.dirname(folder), exist_ok=True)  # save_adapter makes the last folder only
    if pickle:
        model.save_adapter(folder, name)
        return
    try:
        model.save_adapter(folder, name, use_safetensors=True)
    except RuntimeError:  # shared tensors (ln_before): the same keys and values, one copy per name
        model.save_adapter(folder, name)
        for pickled, safe in (
            ("pytorch_adapter.bin", "adapter.safetensors"),
            ("pytorch_model_head.bin", "model_head.safetensors"),
        ):
            path = os.path.join(folder, pickled)
            if os.path.exists(path):
                state = torch.load(path, weights_only=True)  # the file this process just wrote
                save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, os.path.join(folder, safe))
                os.remove(path)


def run(spec: dict) -> None:
    ids = load_file(spec["ids"])["input_ids"]
    outputs = {}
    for case in spec["cases"]:
        model = load_base(case["base"])
        adapters.init(model)
        for adapter in case["adapters"]:
            config = getattr(adapters, adapter["config"])(**adapter.get("overrides", {}))
            model.add_adapter(adapter["name"], config=config)
            randomize(model, adapter["name"], adapter["seed"])
        active = case["active"]
        model.set_active_adapters(active[0] if len(active) == 1 else Stack(*active))
        model.eval()
        with torch.no_grad():
            outputs[case["id"]] = model(input_ids=ids).logits.contiguous()
        for adapter in case["adapters"]:
            if adapter.get("save"):
                save(model, adapter["name"], adapter["save"], adapter.get("pickle", False))
    save_file(outputs, spec["out"])
    print(f"adapters {adapters.__version__}, transformers {transformers.__version__}: {len(outputs)} cases")


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        run(json.load(fh))
