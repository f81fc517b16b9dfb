"""Fuzzed adapter folders: every outcome is a correct load or one LorakitError with the model untouched.

Hypothesis mutates ``adapter_config.json`` values (any JSON value in any field) and the safetensors file
(its header's JSON, its length prefix, the tensor bytes). After each attempt:

* if lorakit loaded it, its logits equal the closed form computed independently from the same files
  (``W + s·B A`` per adapted module, ``s`` from the JSON config as PEFT defines it);
* otherwise the error is a :class:`~lorakit.errors.LorakitError` and the base model is byte-identical.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import input_ids, tiny_llama
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import LorakitError

FIELDS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "bias", "use_rslora",
    "modules_to_save", "init_lora_weights", "loftq_config", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "task_type", "inference_mode", "use_dora", "peft_type", "base_model_name_or_path",
    "revision", "lora_bias", "megatron_config", "unknown_field",
]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["q_proj", "v_proj", "all-linear", "(", "LORA", "CAUSAL_LM", "none", "all", ".*", "false", "8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(folder)
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def closed_form_logits(folder, ids):
    """The logits the files define, computed without lorakit: W + s·B A on every module the file adapts."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    base = tiny_llama()
    params = dict(base.named_parameters())
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = state[key.replace("lora_A", "lora_B")]
        r = next(
            (v for k, v in (config.get("rank_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", module)),
            config.get("r", 8),
        )
        alpha = next(
            (v for k, v in (config.get("alpha_pattern") or {}).items() if re.match(rf"(.*\.)?({k})$", module)),
            config.get("lora_alpha", 8),
        )
        s = alpha / (math.sqrt(r) if config.get("use_rslora") is True else r)  # JSON's true, nothing else
        with torch.no_grad():
            params[f"{module}.weight"].add_(s * b.float() @ a.float())
    return base(ids).logits


def attempt(folder):
    base = tiny_llama()
    snap = {k: v.clone() for k, v in base.state_dict().items()}
    ids = input_ids()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, folder)
    except LorakitError:
        now = base.state_dict()
        assert list(now) == list(snap)
        assert all(torch.equal(now[k], v) for k, v in snap.items()), "a refused load changed the model"
        assert not any(type(m).__module__.startswith("lorakit") for m in base.modules()), "adapter layers left behind"
        return "refused"
    got = model(ids).logits
    want = closed_form_logits(folder, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4, equal_nan=True), "loaded, but not what the files say"
    return "loaded"


@SETTINGS
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_fuzzed_config_values_load_correctly_or_are_refused(tmp_path, reference, field, value):
    config = json.loads(reference["adapter_config.json"])
    config[field] = value
    folder = tmp_path / f"c{abs(hash((field, repr(value))))}"
    write(folder, {**reference, "adapter_config.json": json.dumps(config).encode()})
    attempt(folder)


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@SETTINGS
@given(
    path=st.lists(st.sampled_from(["dtype", "shape", "data_offsets", 0, 1]), min_size=1, max_size=2),
    value=json_values | st.sampled_from(["F16", "BF16", "I64", "U8", "F64", "BOOL"]),
    which=st.integers(0, 7),
)
def test_fuzzed_safetensors_header_fields_load_correctly_or_are_refused(tmp_path, reference, path, value, which):
    header, data = _split(reference["adapter_model.safetensors"])
    keys = sorted(k for k in header if k != "__metadata__")
    entry = header[keys[which % len(keys)]]
    holder, key = entry, path[0]
    for step in path[1:]:
        holder = (
            holder.get(key)
            if isinstance(holder, dict)
            else holder[key]
            if isinstance(holder, list) and isinstance(key, int) and key < len(holder)
            else None
        )
        key = step
        if holder is None:
            return
    if isinstance(holder, dict) and isinstance(key, str):
        holder[key] = value
    elif isinstance(holder, list) and isinstance(key, int) and key < len(holder):
        holder[key] = value
    else:
        return
    folder = tmp_path / f"h{abs(hash((tuple(path), repr(value), which)))}"
    write(folder, {**reference, "adapter_model.safetensors": _join(header, data)})
    attempt(folder)


@SETTINGS
@given(
    kind=st.sampled_from(["length", "truncate", "flip", "header_bytes", "extra_key"]),
    n=st.integers(0, 2**64 - 1),
    byte=st.integers(0, 255),
)
def test_fuzzed_safetensors_bytes_load_correctly_or_are_refused(tmp_path, reference, kind, n, byte):
    raw = reference["adapter_model.safetensors"]
    header, data = _split(raw)
    text = json.dumps(header).encode()
    if kind == "length":
        out = _join(text, data, length=n)
    elif kind == "truncate":
        out = raw[: n % len(raw)]
    elif kind == "flip":
        i = n % len(raw)
        out = raw[:i] + bytes([byte]) + raw[i + 1 :]
    elif kind == "header_bytes":
        i = n % len(text)
        out = _join(text[:i] + bytes([byte]) + text[i + 1 :], data)
    else:  # a tensor under a key of the base model's, placed inside the data
        header["base_model.model.model.layers.0.mlp.down_proj.weight"] = {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [0, 4],
        }
        out = _join(header, data)
    folder = tmp_path / f"b{kind}{n % 100003}_{byte}"
    write(folder, {**reference, "adapter_model.safetensors": out})
    attempt(folder)
