"""Bottleneck adapters against the adapters library (AdapterHub, adapters 1.3.0) on identical base weights.

The adapters library pins transformers~=4.57.6, so it runs in its own virtualenv (``make oracle-venv``, part of
``make install``; tests/oracles/adapters_oracle.py). Tiny random LLaMA, GPT-2 and BERT models are saved here
(transformers 5) as safetensors folders; the oracle loads them, adds bottleneck adapters with random weights,
writes its outputs for fixed input ids and saves each adapter as safetensors; lorakit then loads those folders
onto the same bases and must give the same outputs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import MODEL_FACTORIES, input_ids
from lorakit.errors import AdapterFileError
from lorakit.tuners.bottleneck.adapterhub import config_from_adapters, load_adapters_library
from lorakit.tuners.bottleneck.layer import BottleneckLayer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLE_VENV = ROOT / ".venv-adapters"  # `make oracle-venv` (part of `make install`) builds it, then marks it .installed
ORACLE_PYTHON = pathlib.Path(os.environ.get("LORAKIT_ADAPTERS_PYTHON", ORACLE_VENV / "bin" / "python"))
ORACLE_READY = ORACLE_PYTHON.exists() and (
    "LORAKIT_ADAPTERS_PYTHON" in os.environ or (ORACLE_VENV / ".installed").exists()
)
SCRIPT = ROOT / "tests" / "oracles" / "adapters_oracle.py"
ARCHS = ["llama", "gpt2", "bert"]

# Options beyond the two standard configs: where the residual is taken, layer norms before/after, learned and
# per-channel scaling, gating, other non-linearities, per-block reduction factors, leave_out.
OPTIONS_GPT2 = dict(
    mh_adapter=True,
    output_adapter=True,
    reduction_factor={"0": 8, "default": 16},
    non_linearity="gelu_new",
    original_ln_before=True,
    residual_before_ln=False,
    adapter_residual_before_ln=True,
    ln_before=True,
    ln_after=True,
    scaling="channel",
    use_gating=True,
)
OPTIONS_BERT = dict(
    mh_adapter=True,
    output_adapter=True,
    reduction_factor=8,
    non_linearity="gelu",
    original_ln_before=True,
    residual_before_ln="post_add",
    ln_after=True,
    scaling="learned",
    leave_out=[1],
)
OPTIONS_LLAMA = dict(
    mh_adapter=True, output_adapter=False, reduction_factor=4, non_linearity="leakyrelu", original_ln_before=True
)
OPTIONS_LLAMA.update(residual_before_ln=False, ln_before=True, scaling=0.5)

# case id -> (architecture, [(adapter name, adapters-library config class, overrides)], saved as a pickle)
CASES: dict[str, tuple[str, list[tuple[str, str, dict[str, Any]]], bool]] = {
    **{f"{arch}-base": (arch, [], False) for arch in ARCHS},
    **{f"{arch}-pfeiffer": (arch, [("pf", "SeqBnConfig", {})], False) for arch in ARCHS},
    **{f"{arch}-houlsby": (arch, [("hb", "DoubleSeqBnConfig", {})], False) for arch in ARCHS},
    "llama-parallel": ("llama", [("par", "ParBnConfig", {})], False),
    "gpt2-options": ("gpt2", [("opt", "BnConfig", OPTIONS_GPT2)], False),
    "bert-options": ("bert", [("opt", "BnConfig", OPTIONS_BERT)], False),
    "llama-options": ("llama", [("opt", "BnConfig", OPTIONS_LLAMA)], False),
    "llama-stack": ("llama", [("a", "SeqBnConfig", {}), ("b", "DoubleSeqBnConfig", {"reduction_factor": 8})], False),
    "llama-pickle": ("llama", [("hb", "DoubleSeqBnConfig", {})], True),
}
ADAPTER_CASES = [c for c, (_, adapters, pickled) in CASES.items() if len(adapters) == 1 and not pickled]


class Oracle:
    def __init__(self, root: pathlib.Path, outputs: dict[str, torch.Tensor]) -> None:
        self.root, self.outputs = root, outputs

    def folder(self, case: str, adapter: str) -> pathlib.Path:
        return self.root / "adapters" / case / adapter


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    if not ORACLE_READY:
        pytest.skip(
            f"the adapters-library oracle virtualenv {ORACLE_VENV} is missing or incomplete; `make oracle-venv`"
        )
    root = tmp_path_factory.mktemp("adapters-oracle")
    for arch in ARCHS:
        MODEL_FACTORIES[arch]().save_pretrained(root / "base" / arch)  # safetensors
    save_file({"input_ids": input_ids()}, root / "ids.safetensors")
    cases = []
    for case, (arch, adapters, pickled) in CASES.items():
        entries = [
            {"name": n, "config": c, "overrides": o, "seed": 10 + i, "save": str(root / "adapters" / case / n)}
            for i, (n, c, o) in enumerate(adapters)
        ]
        for entry in entries:
            entry["pickle"] = pickled
        active = [n for n, _, _ in adapters]
        cases.append({"id": case, "base": str(root / "base" / arch), "adapters": entries, "active": active})
    spec = {"ids": str(root / "ids.safetensors"), "out": str(root / "outputs.safetensors"), "cases": cases}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(ORACLE_PYTHON), str(SCRIPT), str(root / "spec.json")], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"the adapters-library oracle failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return Oracle(root, load_file(root / "outputs.safetensors"))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def test_transformers_4_and_5_build_the_same_base_models(oracle):
    """The oracle's transformers 4.57 loads the folders transformers 5 saved to the same weights and outputs."""
    for arch in ARCHS:
        model = MODEL_FACTORIES[arch]()
        torch.testing.assert_close(logits(model), oracle.outputs[f"{arch}-base"], rtol=0, atol=1e-6)
        folder = oracle.root / "base" / arch  # and transformers 5 reads its own folder back to the same weights
        again = type(model).from_pretrained(folder).eval()
        assert all(torch.equal(t, model.state_dict()[k]) for k, t in again.state_dict().items())


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapters_library_files_load_with_equal_outputs(oracle, case):
    arch, [(name, _, _)], _ = CASES[case]
    model = load_adapters_library(MODEL_FACTORIES[arch](), oracle.folder(case, name))
    assert isinstance(model.peft_config["default"], lorakit.BottleneckConfig)
    expected = oracle.outputs[case]
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    base = oracle.outputs[f"{arch}-base"]
    assert (expected - base).abs().max() > 0.1 * base.abs().max()  # the random adapters do change the model


def test_stacked_adapters_compute_the_library_s_stack(oracle):
    first = load_adapters_library(MODEL_FACTORIES["llama"](), oracle.folder("llama-stack", "a"), "a")
    model = load_adapters_library(first, oracle.folder("llama-stack", "b"), "b")
    assert model is first and model.active_adapters == ["a"]
    model.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(model), oracle.outputs["llama-stack"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "preset"), [("llama-pfeiffer", "pfeiffer"), ("gpt2-houlsby", "houlsby"), ("llama-parallel", "parallel")]
)
def test_presets_are_the_adapters_library_standard_configs(oracle, case, preset):
    _, [(name, _, _)], _ = CASES[case]
    saved = json.loads((oracle.folder(case, name) / "adapter_config.json").read_text())
    ours = getattr(lorakit.BottleneckConfig, preset)()
    assert config_from_adapters(saved).to_dict() == ours.to_dict()


@pytest.mark.parametrize("case", ["llama-pfeiffer", "bert-options"])
def test_a_loaded_adapter_saves_in_lorakit_s_format_and_reloads(oracle, case, tmp_path):
    arch, [(name, _, _)], _ = CASES[case]
    model = load_adapters_library(MODEL_FACTORIES[arch](), oracle.folder(case, name))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        saved["peft_type"] == "BOTTLENECK" and saved["placement"] == lorakit.tuners.bottleneck.DEFAULT_PLACEMENTS[arch]
    )
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".bottleneck_" in k for k in keys)
    again = lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(again), oracle.outputs[case], rtol=1e-5, atol=1e-5)


def test_a_pickled_adapter_is_refused_and_the_model_is_unchanged(oracle):
    folder = oracle.folder("llama-pickle", "hb")
    assert (folder / "pytorch_adapter.bin").exists() and not (folder / "adapter.safetensors").exists()
    model = MODEL_FACTORIES["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=r"pickle.*never unpickles.*use_safetensors=True"):
        load_adapters_library(model, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_saved_head_that_differs_from_the_model_s_is_refused(oracle, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(oracle.folder("bert-pfeiffer", "pf"), folder)
    head = load_file(folder / "model_head.safetensors")
    assert set(head) == {"classifier.weight", "classifier.bias"}
    load_adapters_library(MODEL_FACTORIES["bert"](), folder)  # the base model's own head: fine
    head["classifier.bias"] = head["classifier.bias"] + 1.0
    save_file(head, folder / "model_head.safetensors")
    model = MODEL_FACTORIES["bert"]()
    with pytest.raises(AdapterFileError, match="prediction head.*classifier.bias"):
        load_adapters_library(model, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())


def test_tensors_that_fit_no_site_are_refused(oracle, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(oracle.folder("llama-pfeiffer", "pf"), folder)
    tensors = load_file(folder / "adapter.safetensors")
    tensors["model.layers.5.output_adapters.adapters.pf.adapter_up.bias"] = torch.zeros(32)
    save_file(tensors, folder / "adapter.safetensors")
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(AdapterFileError, match=r"layers\.5\.output_adapters.*fits no bottleneck adapter"):
        load_adapters_library(model, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())  # the residual taps went with the layers


# -- the library's configs and folders, without the oracle ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architecture": "lora"}, "is 'lora'; lorakit reads its bottleneck adapters"),
        ({"inv_adapter": "nice"}, "inv_adapter='nice', a feature of the adapters library that lorakit does not"),
        ({"phm_layer": True}, "phm_layer=True"),
        ({"cross_adapter": True}, "cross_adapter=True"),
        ({"stochastic_depth": 0.1}, "stochastic_depth=0.1"),
        ({"original_ln_after": False}, "original_ln_after=False is not supported"),
    ],
)
def test_library_configs_lorakit_does_not_compute_are_refused(fields, message):
    data = {"config": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu"}}
    data["config"].update(fields)
    with pytest.raises(lorakit.ConfigError, match=message):
        config_from_adapters({**data, "version": "adapters.1.3.0"})


def test_library_configs_by_name_and_from_before_its_version_field():
    assert config_from_adapters({"config": "seq_bn"}).to_dict() == lorakit.BottleneckConfig.pfeiffer().to_dict()
    assert config_from_adapters({"config": "double_seq_bn"}).non_linearity == "swish"
    old = {"config": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "gelu"}}
    assert config_from_adapters(old).non_linearity == "gelu_new"  # adapter-transformers v1/v2 files: tanh GELU
    assert config_from_adapters({**old, "version": "adapters.1.3.0"}).non_linearity == "gelu"


def test_folders_that_are_not_the_library_s_safetensors_are_refused(tmp_path):
    model = MODEL_FACTORIES["llama"]()
    config = {"config": "seq_bn", "name": "pf", "model_type": "llama", "version": "adapters.1.3.0"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_adapter.bin").write_bytes(b"\x80\x04 never read")
    with pytest.raises(AdapterFileError, match=r"'pytorch_adapter.bin', a pickle.*save_adapter\(folder, 'pf'"):
        load_adapters_library(model, tmp_path)
    (tmp_path / "pytorch_adapter.bin").unlink()
    with pytest.raises(AdapterFileError, match="expected 'adapter.safetensors'"):
        load_adapters_library(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    save_file({}, tmp_path / "adapter.safetensors")
    with pytest.raises(lorakit.ConfigError, match="saved for model_type='gpt2'; this model is 'llama'"):
        load_adapters_library(model, tmp_path)
    lorakit.get_peft_model(MODEL_FACTORIES["llama"](), lorakit.BottleneckConfig.pfeiffer()).save_pretrained(tmp_path)
    with pytest.raises(lorakit.ConfigError, match="a PEFT/lorakit adapter.*PeftModel.from_pretrained"):
        load_adapters_library(model, tmp_path)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())


def test_peft_model_from_pretrained_on_a_library_folder_points_to_the_loader(oracle):
    arch, [(name, _, _)], _ = CASES["llama-pfeiffer"]
    with pytest.raises(lorakit.ConfigError, match=r"adapters library \(AdapterHub\): load it with lorakit"):
        lorakit.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), oracle.folder("llama-pfeiffer", name))
