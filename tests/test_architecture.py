"""Structural rules: imports flow one way, and lorakit never imports PEFT."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Lower layers never import higher ones:
# CLI -> training -> hub/estimate -> model API -> persistence/injection -> layers -> config/errors.
RANK = {
    "lorakit.errors": 0,
    "lorakit.cpu_blas": 0,
    "lorakit.io": 1,
    "lorakit.push": 1,  # uploads a folder that a callback (save_pretrained) writes
    "lorakit.config": 2,
    "lorakit.tuners": 2,  # the methods' rooms: configs at rank 2, layers at 3, tuners (model, combine) at 5
    "lorakit.tuners.lora.layer": 3,
    "lorakit.tuners.lora.delta": 3,
    "lorakit.tuners.lora.variant": 3,
    "lorakit.tuners.lora.dora": 3,
    "lorakit.tuners.lora.fused": 3,
    "lorakit.tuners.lora.mixed": 3,
    "lorakit.tuners.lora.loftq": 3,
    "lorakit.tuners.lora.starts": 3,  # PiSSA, OLoRA, orthogonal: A and B (and the residual) from the base weight
    "lorakit.tuners.lora.kinds": 3,
    "lorakit.tuners.lora.mha": 3,  # LoRA on nn.MultiheadAttention (its own layer and kind)
    "lorakit.tuners.lora.param_names": 2,  # target_parameters' names, read by LoraConfig.check_file
    "lorakit.tuners.lora.param_wrapper": 3,  # LoRA on an nn.Parameter (fused MoE experts)
    "lorakit.tuners.adalora.layer": 3,
    "lorakit.tuners.ia3.layer": 3,
    "lorakit.tuners.prompt_learning.encoder": 3,
    "lorakit.tuners.prompt_learning.cache": 3,
    "lorakit.tuners.prompt_tuning.encoder": 3,
    "lorakit.tuners.p_tuning.encoder": 3,
    "lorakit.tuners.prefix_tuning.encoder": 3,
    "lorakit.tuners.bottleneck.layer": 3,
    "lorakit.tuners.trainable_tokens.layer": 3,
    "lorakit.layers": 3,
    "lorakit.targeting": 4,
    "lorakit.kbit": 4,
    "lorakit.tuners.base": 5,
    "lorakit.undo": 4,  # the undos a running load keeps (a context variable; imports nothing of lorakit)
    "lorakit.tuners.modules_to_save": 5,  # whole-module copies, for both engines (Tuner)
    "lorakit.tuners.lora.model": 5,
    "lorakit.tuners.lora.moe": 5,  # MoE models' targets (PEFT's v4 -> v5 rewrite, the all-linear warning)
    "lorakit.tuners.lora.param_targets": 5,  # which parameters target_parameters selects, and their injection
    "lorakit.tuners.adalora.model": 5,
    "lorakit.tuners.ia3.model": 5,
    "lorakit.tuners.prompt_learning.model": 5,
    "lorakit.tuners.prompt_learning.tasks": 5,
    "lorakit.tuners.prompt_learning.generation": 5,
    "lorakit.tuners.prompt_tuning.model": 5,
    "lorakit.tuners.p_tuning.model": 5,
    "lorakit.tuners.prefix_tuning.model": 5,
    "lorakit.tuners.bottleneck.model": 5,
    "lorakit.tuners.tying": 5,  # tied input/output embeddings (ensure_weight_tying), read by the aux modules
    "lorakit.tuners.trainable_tokens.auxiliary": 5,  # LoRA's trainable_token_indices (BaseTuner.inject)
    "lorakit.tuners.trainable_tokens.model": 5,
    "lorakit.tuners.lora.combine": 5,
    "lorakit.tuners.lora.start_conversion": 5,  # a trained PiSSA/OLoRA adapter as plain LoRA for the original base
    "lorakit.tuners.lora.loraplus": 5,  # LoRA+ parameter groups over a model's LoRA layers
    "lorakit.tuners.lora.subconfigs": 2,  # EvaConfig, CordaConfig (validated by LoraConfig)
    "lorakit.tuners.lora.ipca": 3,  # incremental PCA (EVA's SVD of layer inputs)
    "lorakit.tuners.lora.eva_collect": 5,  # EVA's data pass: hooks, convergence, rank redistribution
    "lorakit.tuners.lora.eva": 5,  # EVA's data-driven start over a LoRA model (initialize_lora_eva_weights)
    "lorakit.tuners.lora.corda": 5,  # CorDA: covariance hooks, decomposition, residual start
    "lorakit.persistence": 6,
    "lorakit.forward_signature": 6,  # what inspect.signature(model.forward) reports (model.py, tasks.py)
    "lorakit.functional": 6,  # PEFT's state-dict and injection functions, over persistence and the tuners
    "lorakit.status": 6,  # get_layer_status / get_model_status
    "lorakit.model_card": 6,  # README.md beside the adapter files: reads configs and the adapter's tensors
    "lorakit.optimizers": 6,  # PEFT's peft.optimizers import path
    "lorakit.sharding": 6,  # whole adapter tensors from FSDP2 shards, for saves (training, the HF Trainer)
    "lorakit.model": 7,
    "lorakit.tasks": 7,
    "lorakit.tuners.bottleneck.adapterhub": 7,  # reads the adapters library's folders into a PeftModel
    "lorakit.tuners.lora.hotswap": 7,  # reads an adapter folder (persistence) into a loaded adapter's tensors
    "lorakit.hub": 8,
    "lorakit.auto": 8,  # AutoPeftModel*: the base model by its Auto class, then PeftModel.from_pretrained
    "lorakit.estimate": 8,
    "lorakit.integrations": 8,  # the HF Trainer and TRL with lorakit models: above the model API, below training
    "lorakit.training": 9,
    "lorakit.serve": 9,  # the HTTP server: over the model API (and training's chat helpers), under the CLI
    "lorakit.cli": 10,
    "lorakit": 99,
}


def rank_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in RANK:
            return RANK[name]
    raise AssertionError(f"module {module} has no rank in tests/test_architecture.py; add it")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def runtime_imports(tree: ast.AST) -> list[str]:
    """Absolute lorakit imports, skipping those under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_imports_flow_one_way():
    problems = []
    for path in SRC.rglob("*.py"):
        me = module_name(path)
        for imported in runtime_imports(ast.parse(path.read_text())):
            if imported.split(".")[0] == "peft":
                problems.append(f"{me} imports {imported}")
            if imported.startswith("lorakit") and rank_of(imported) > rank_of(me):
                problems.append(f"{me} (rank {rank_of(me)}) imports upward {imported} (rank {rank_of(imported)})")
    assert not problems, "\n".join(problems)


def test_import_lorakit_does_not_load_peft():
    # nor the HF Trainer or TRL, which lorakit.integrations imports only when one of its names is asked for
    heavy = "('peft', 'trl', 'transformers.trainer', 'lorakit.integrations.trainer')"
    code = f"import sys, lorakit, lorakit.integrations; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_files_stay_small():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not big, f"files over 600 lines (probably two ideas): {big}"


GENERIC = [
    "lorakit.config",
    "lorakit.model",
    "lorakit.tasks",
    "lorakit.persistence",
    "lorakit.layers.kinds",
    "lorakit.layers.base",
    "lorakit.layers.routing",
]
METHODS = ("lorakit.tuners",)


def test_the_generic_level_imports_no_method():
    """Registries point up: a method registers itself; config.py and model.py never import one."""
    for name in GENERIC:
        path = SRC.parent / (name.replace(".", "/") + ".py")
        found = [i for i in runtime_imports(ast.parse(path.read_text())) if i.startswith(METHODS)]
        assert not found, f"{name} imports {found}"


def test_a_method_is_a_config_and_a_tuner_registered_in_one_line(monkeypatch):
    """The generic level builds whatever method a config names: the file's peft_type picks the config class,
    the config picks the tuner (here a toy method that registers without touching lorakit's code)."""
    from dataclasses import dataclass
    from typing import ClassVar

    from torch import nn

    import lorakit.config as config_module
    from conftest import input_ids, tiny_llama
    from lorakit import PeftConfig, PeftModel, PeftType

    @dataclass
    class ToyConfig(PeftConfig):
        PEFT_TYPE: ClassVar[PeftType] = PeftType.VERA
        scale: float = 2.0

    class ToyTuner(nn.Module):  # the smallest tuner: it only wraps the model
        def __init__(self, model, peft_config, adapter_name, autocast_adapter_dtype=True):
            super().__init__()
            self.model, self.peft_config, self.active_adapters = model, peft_config, [adapter_name]

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    monkeypatch.setattr(config_module, "_METHODS", dict(config_module._METHODS))  # undone after the test
    config_module.register_method(ToyConfig, ToyTuner)  # the one line a method adds

    config = PeftConfig.from_dict({"peft_type": "VERA", "scale": 3.0, "task_type": "CAUSAL_LM"})
    assert type(config) is ToyConfig and config.scale == 3.0
    model = PeftModel(tiny_llama(), config)
    assert type(model.base_model) is ToyTuner
    assert model(input_ids()).logits.shape[-1] == 96
