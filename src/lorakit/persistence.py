"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are the model's state-dict keys under the ``PeftModel`` (``base_model.model.<module path>.<tensor>``)
with the adapter name taken out: ``...q_proj.lora_A.weight``, ``...embed_tokens.lora_embedding_A``,
``...classifier.weight`` for a ``modules_to_save`` copy. The adapter named ``default`` is written at the
folder's root and any other adapter into a subfolder of its name — exactly what PEFT writes and reads.

The tensors to save are found through the adapter layers themselves (their ``adapter_state``), never by
searching key names for substrings.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.config import CONFIG_NAME, LoraConfig
from lorakit.errors import AdapterFileError, ShapeMismatchError
from lorakit.io import atomic_write_files, resolve_adapter_file
from lorakit.layers import LoraLayer, ModulesToSaveWrapper

if TYPE_CHECKING:
    from lorakit.tuner import LoraModel

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def module_key(module_name: str, tensor_key: str) -> str:
    return f"{KEY_PREFIX}{module_name}.{tensor_key}" if module_name else f"{KEY_PREFIX}{tensor_key}"


# PEFT's rule for save_embedding_layers="auto": save base embedding weights when a module of these names is adapted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_tensors(
    lora_model: LoraModel, adapter_name: str, save_embedding_layers: bool | str = False
) -> dict[str, torch.Tensor]:
    """File key -> live tensor for everything adapter ``adapter_name`` owns.

    Args:
        save_embedding_layers: also include the input/output embedding weights, for models whose vocabulary
            was resized. ``"auto"`` (PEFT's rule) does so when a module named ``embed_tokens`` or ``lm_head``
            holds this adapter.
    """
    config = lora_model.peft_config[adapter_name]
    out = required_keys(lora_model, adapter_name)
    if config.bias == "lora_only":
        for name, layer in lora_model.lora_layers():
            bias = getattr(layer.base_layer, "bias", None)
            if adapter_name in layer.r and isinstance(bias, torch.Tensor):
                out[module_key(name, "base_layer.bias")] = bias
    if config.bias == "all":
        for name, param in _trainable_bias_candidates(lora_model):
            out[module_key("", name)] = param
    out.update(_embedding_tensors(lora_model, adapter_name, save_embedding_layers))
    return out


def _trainable_bias_candidates(lora_model: LoraModel) -> list[tuple[str, torch.Tensor]]:
    """Biases that ``bias="all"`` trains: every bias outside ``modules_to_save`` wrappers (their copies are
    saved whole anyway, and their originals stay frozen)."""
    inside: set[int] = set()
    for _, layer in lora_model.adapter_layers():
        if isinstance(layer, ModulesToSaveWrapper):
            inside.update(id(p) for p in layer.parameters())
    return [
        (name, p)
        for name, p in lora_model.model.named_parameters()
        if name.rsplit(".", 1)[-1] == "bias" and id(p) not in inside
    ]


def _embedding_tensors(lora_model: LoraModel, adapter_name: str, mode: bool | str) -> dict[str, torch.Tensor]:
    model = lora_model.model
    only_wrapped = mode == "auto"  # PEFT's auto mode saves the embeddings that carry an adapter
    if mode == "auto":
        mode = any(
            name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
            for name, layer in lora_model.lora_layers()
            if adapter_name in layer.r
        )
    if not mode or not hasattr(model, "get_input_embeddings"):
        return {}
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not any(module is w for w in wanted):
            continue
        if isinstance(module, LoraLayer):
            name, module = f"{name}.base_layer", module.base_layer
        elif only_wrapped:
            continue
        for key, param in module.named_parameters(remove_duplicate=False):
            out[module_key(name, key)] = param
    return out


def required_keys(lora_model: LoraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The keys an adapter file must hold: the factors and ``modules_to_save`` copies (biases are optional)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_model.adapter_layers():
        if adapter_name in layer.adapter_names():
            for key, tensor in lora_model.layer_file_state(name, layer, adapter_name).items():
                out[module_key(name, key)] = tensor
    return out


def save_adapter(
    lora_model: LoraModel,
    adapter_name: str,
    directory: str | os.PathLike,
    config: LoraConfig,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
) -> None:
    """Write one adapter's config and weights into ``directory``, replacing what was there atomically.

    Both files are written completely to temporary files first; only then are they renamed into place, so an
    error (full disk, unserialisable tensor, interrupt) leaves any previous adapter in the folder intact.

    Raises:
        AdapterFileError: the folder cannot be created or written.
    """
    tensors = adapter_tensors(lora_model, adapter_name, save_embedding_layers)
    # Only embedding base weights end in "base_layer.weight"; adapter factors end in "lora_A.weight" etc.
    if save_embedding_layers == "auto" and any(k.endswith("base_layer.weight") for k in tensors):
        warnings.warn(
            "an embedding layer is adapted, so its base weight is saved with the adapter (as PEFT does, for "
            "resized vocabularies); pass save_embedding_layers=False to save only the adapter",
            stacklevel=3,
        )
    write_adapter(directory, tensors, config, safe_serialization)


def write_adapter(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: LoraConfig, safe_serialization: bool = True
) -> None:
    """Write ``tensors`` (file key -> tensor) and ``config`` into ``directory``, both replaced atomically.

    Raises:
        AdapterFileError: the folder cannot be created or written.
    """
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise AdapterFileError(f"cannot create adapter folder {directory!r}: {exc.strerror or exc}") from exc
    if not os.access(directory, os.W_OK):
        raise AdapterFileError(f"adapter folder {directory!r} is not writable")
    # safetensors refuses tensors that share memory (tied weights): give each key its own contiguous copy.
    state = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}

    def write_weights(tmp: str) -> None:
        if safe_serialization:
            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(config.to_json())

    weights_name = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    try:
        atomic_write_files(
            {os.path.join(directory, weights_name): write_weights, os.path.join(directory, CONFIG_NAME): write_config}
        )
    except PermissionError as exc:
        raise AdapterFileError(f"cannot write adapter into {directory!r}: {exc.strerror or exc}") from exc


def read_adapter_weights(path: str | os.PathLike, subfolder: str | None = None) -> dict[str, torch.Tensor]:
    """Load the weights file of an adapter folder: safetensors first, else a legacy ``.bin``.

    A ``.bin`` file is read with ``torch.load(weights_only=True)``, which refuses pickled code.

    Raises:
        AdapterFileError: no weights file, or one that cannot be parsed.
    """
    try:
        file = resolve_adapter_file(path, WEIGHTS_NAME, subfolder=subfolder)
    except AdapterFileError:
        try:
            file = resolve_adapter_file(path, LEGACY_WEIGHTS_NAME, subfolder=subfolder)
        except AdapterFileError:
            folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
            raise AdapterFileError(
                f"no adapter weights in {folder!r}: expected {WEIGHTS_NAME!r} (or a legacy {LEGACY_WEIGHTS_NAME!r})"
            ) from None
    try:
        if file.endswith(".safetensors"):
            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        raise AdapterFileError(f"adapter weights file {file!r} is corrupt or unreadable: {exc}") from exc
    except Exception as exc:  # torch.load(weights_only=True) raises UnpicklingError for unsafe content
        raise AdapterFileError(f"adapter weights file {file!r} cannot be loaded safely: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFileError(f"adapter weights file {file!r} does not hold a dict of tensors")
    return state


def _peft_alias(key: str, adapter_name: str) -> str:
    """PEFT's ``bias="all"`` files also hold ``<m>.modules_to_save.bias`` (no adapter name): name it."""
    head, sep, tail = key.partition(".modules_to_save.")
    return f"{head}{sep}{adapter_name}.{tail}" if sep else key


def load_adapter_state(lora_model: LoraModel, adapter_name: str, state: dict[str, Any]) -> None:
    """Copy a file's tensors into adapter ``adapter_name``; all checks happen before any tensor is written.

    Raises:
        AdapterFileError: the file lacks tensors the adapter needs, or holds tensors that match no module.
        ShapeMismatchError: a tensor's shape differs from the model's; names the first such key.
    """
    required = required_keys(lora_model, adapter_name)
    optional = adapter_tensors(lora_model, adapter_name, save_embedding_layers=True)
    # remove_duplicate=False: a tied weight (lm_head = embed_tokens) answers to both of its names.
    everything = {module_key("", n): p for n, p in lora_model.model.named_parameters(remove_duplicate=False)}
    everything.update(
        (module_key("", n), b)
        for n, b in lora_model.model.named_buffers(remove_duplicate=False)
        if module_key("", n) not in everything
    )
    missing = [k for k in required if k not in state]
    if missing:
        raise AdapterFileError(
            f"the adapter file lacks {len(missing)} of the {len(required)} tensors this adapter needs, first "
            f"{missing[0]!r}; was it saved for another model or with other target_modules?"
        )
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    unexpected: list[str] = []
    for key, tensor in state.items():
        dest = optional.get(key)
        if dest is None:
            dest = everything.get(key, everything.get(_peft_alias(key, adapter_name)))
        if dest is None:
            unexpected.append(key)
            continue
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ShapeMismatchError(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(dest.shape)}; the adapter was trained on a different base model or rank"
            )
        plan.append((dest, tensor))
    if unexpected:
        raise AdapterFileError(
            f"the adapter file holds {len(unexpected)} tensors that match no module of this model, first "
            f"{unexpected[0]!r}; was it saved for another base model?"
        )
    with torch.no_grad():
        for dest, tensor in plan:
            dest.copy_(tensor)
