"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are the model's state-dict keys under the ``PeftModel`` (``base_model.model.<module path>.<tensor>``)
with the adapter name taken out: ``...q_proj.lora_A.weight``, ``...embed_tokens.lora_embedding_A``,
``...classifier.weight`` for a ``modules_to_save`` copy. The adapter named ``default`` is written at the
folder's root and any other adapter into a subfolder of its name — exactly what PEFT writes and reads.

The tensors to save are found through the adapter layers themselves (their ``adapter_state``), never by
searching key names for substrings.

What this module asks a tuner (``BaseTuner`` answers for every weight method): ``peft_config``, ``model``,
``adapter_layers()``, ``weight_layers()`` and ``layer_file_state(...)``. A tuner may also say, as class
attributes, ``file_key_prefix`` (how its files name a model tensor; default ``base_model.model.``) and
``own_file_tensors(adapter_name, loading)``: the adapter's tensors that live outside the model's modules, by file
key (a prompt-learning adapter's ``prompt_embeddings``) — what is written when saving, what a file's tensor is
copied into when loading.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.config import CONFIG_NAME, PeftConfig, read_json
from lorakit.errors import AdapterFileError, ShapeMismatchError
from lorakit.io import atomic_write_files, hub_snapshot, is_local_path, reading_folder, resolve_adapter_file
from lorakit.layers import ModulesToSaveWrapper

if TYPE_CHECKING:
    from lorakit.tuners.base import BaseTuner

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def module_key(module_name: str, tensor_key: str, prefix: str = KEY_PREFIX) -> str:
    return f"{prefix}{module_name}.{tensor_key}" if module_name else f"{prefix}{tensor_key}"


def _prefix(tuner: BaseTuner) -> str:
    """How the tuner's files name a model tensor (read from the class: a tuner forwards unknown attributes to
    the model)."""
    return getattr(type(tuner), "file_key_prefix", KEY_PREFIX)


def _own_tensors(tuner: BaseTuner, adapter_name: str, loading: bool) -> dict[str, torch.Tensor]:
    own = getattr(type(tuner), "own_file_tensors", None)
    return dict(own(tuner, adapter_name, loading=loading)) if own is not None else {}


# PEFT's rule for save_embedding_layers="auto": save base embedding weights when a module of these names is adapted.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_tensors(
    tuner: BaseTuner, adapter_name: str, save_embedding_layers: bool | str = False, loading: bool = False
) -> dict[str, torch.Tensor]:
    """File key -> live tensor for everything adapter ``adapter_name`` owns.

    Args:
        save_embedding_layers: also include the input/output embedding weights, for models whose vocabulary
            was resized. ``"auto"`` (PEFT's rule) does so when a module named ``embed_tokens`` or ``lm_head``
            holds this adapter.
        loading: the tensors a file is copied into (they differ from those written only for a tuner's own
            tensors, see ``own_file_tensors``).
    """
    config = tuner.peft_config[adapter_name]
    prefix = _prefix(tuner)
    out = required_keys(tuner, adapter_name, loading=loading)
    if getattr(config, "bias", "none") == "lora_only":
        for name, layer in tuner.weight_layers():
            bias = getattr(layer.base_layer, "bias", None)
            if adapter_name in layer.adapter_names() and isinstance(bias, torch.Tensor):
                out[module_key(name, "base_layer.bias", prefix)] = bias
    if getattr(config, "bias", "none") == "all":
        for name, param in _trainable_bias_candidates(tuner):
            out[module_key("", name, prefix)] = param
    out.update(_embedding_tensors(tuner, adapter_name, save_embedding_layers, loading))
    return out


def _trainable_bias_candidates(tuner: BaseTuner) -> list[tuple[str, torch.Tensor]]:
    """Biases that ``bias="all"`` trains: every bias outside ``modules_to_save`` wrappers (their copies are
    saved whole anyway, and their originals stay frozen)."""
    inside: set[int] = set()
    for _, layer in tuner.adapter_layers():
        if isinstance(layer, ModulesToSaveWrapper):
            inside.update(id(p) for p in layer.parameters())
    return [
        (name, p)
        for name, p in tuner.model.named_parameters()
        if name.rsplit(".", 1)[-1] == "bias" and id(p) not in inside
    ]


def _embedding_tensors(
    tuner: BaseTuner, adapter_name: str, mode: bool | str, loading: bool = False
) -> dict[str, torch.Tensor]:
    model = tuner.model
    targeted = any(
        name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
        for name, layer in tuner.weight_layers()
        if adapter_name in layer.adapter_names()
    )
    # an adapter of token rows saves the rows, not the embedding they belong to (PEFT's "auto")
    targeted = targeted and not getattr(type(tuner), "trains_token_rows", False)
    # PEFT saves the embeddings that carry an adapter when one does ("auto", or True), else every embedding; a load
    # accepts every embedding (older lorakit files hold them all)
    only_wrapped = mode == "auto" or (targeted and not loading)
    if mode == "auto":
        mode = targeted
    if not mode or not hasattr(model, "get_input_embeddings"):
        return {}
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    wrapped = {id(layer) for _, layer in tuner.weight_layers()}
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not any(module is w for w in wanted):
            continue
        if id(module) in wrapped:  # the method's layer wraps it: save its base
            name, module = f"{name}.base_layer", module.base_layer
        elif only_wrapped:
            continue
        for key, param in module.named_parameters(remove_duplicate=False):
            out[module_key(name, key, _prefix(tuner))] = param
    return out


def required_keys(tuner: BaseTuner, adapter_name: str, loading: bool = False) -> dict[str, torch.Tensor]:
    """The keys an adapter file must hold: the factors, ``modules_to_save`` copies and the tuner's own tensors
    (biases are optional)."""
    out = _own_tensors(tuner, adapter_name, loading)
    prefix = _prefix(tuner)
    for name, layer in tuner.adapter_layers():
        if adapter_name in layer.adapter_names():
            for key, tensor in tuner.layer_file_state(name, layer, adapter_name).items():
                out[module_key(name, key, prefix)] = tensor
    return out


def save_adapter(
    tuner: BaseTuner,
    adapter_name: str,
    directory: str | os.PathLike,
    config: PeftConfig,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
    extra_files: dict[str, Callable[[str], None]] | None = None,
) -> None:
    """Write one adapter's config and weights into ``directory``, replacing what was there atomically.

    Both files are written completely to temporary files first; only then are they renamed into place, so an
    error (full disk, unserialisable tensor, interrupt) leaves any previous adapter in the folder intact.
    ``extra_files`` (file name -> writer, e.g. the model card) join the same unit (see :func:`write_adapter`).

    Raises:
        AdapterFileError: the folder cannot be created or written.
    """
    tensors = adapter_tensors(tuner, adapter_name, save_embedding_layers)
    # Only embedding base weights end in "base_layer.weight"; adapter factors end in "lora_A.weight" etc.
    if save_embedding_layers == "auto" and any(k.endswith("base_layer.weight") for k in tensors):
        warnings.warn(
            "an embedding layer is adapted, so its base weight is saved with the adapter (as PEFT does, for "
            "resized vocabularies); pass save_embedding_layers=False to save only the adapter",
            stacklevel=3,
        )
    write_adapter(directory, tensors, config, safe_serialization, extra_files)


def write_adapter(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: PeftConfig,
    safe_serialization: bool = True,
    extra_files: dict[str, Callable[[str], None]] | None = None,
) -> None:
    """Write ``tensors`` (file key -> tensor) and ``config`` into ``directory``, both replaced atomically.

    Args:
        extra_files: more files of the same save (file name -> function writing its content to the path it is
            given), replaced in the same atomic step: the model card ``README.md``.

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

    names = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
    weights_name, other = names if safe_serialization else names[::-1]
    try:
        # config and weights change together (a journal completes a save killed between the renames); a weights
        # file of the other format would shadow or contradict the new one, so it goes in the same step
        writers = {weights_name: write_weights, CONFIG_NAME: write_config, **(extra_files or {})}
        atomic_write_files(directory, writers, removals=(other,))
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AdapterFileError(
            f"cannot write adapter into {directory!r}: {reason}; the adapter that was there (if any) is unchanged"
        ) from exc


def read_adapter_weights(
    path: str | os.PathLike, subfolder: str | None = None, hub: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Load the weights file of an adapter folder or hub repo: safetensors first, else a legacy ``.bin``.

    A ``.bin`` file is read with ``torch.load(weights_only=True)``, which refuses pickled code.

    Args:
        hub: for a hub repo id, the hub options (:func:`lorakit.io.hub_options`); ignored for a local folder.

    Raises:
        AdapterFileError: no weights file, or one that cannot be parsed.
    """
    try:
        file = resolve_adapter_file(path, WEIGHTS_NAME, subfolder=subfolder, hub=hub)
    except AdapterFileError as first:
        try:
            file = resolve_adapter_file(path, LEGACY_WEIGHTS_NAME, subfolder=subfolder, hub=hub)
        except AdapterFileError:
            folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
            why = "" if is_local_path(path) else f" ({first})"  # the hub's reason: offline, no access, ...
            raise AdapterFileError(
                f"no adapter weights in {folder!r}: expected {WEIGHTS_NAME!r} (or a legacy {LEGACY_WEIGHTS_NAME!r})"
                + why
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


def read_adapter(
    path: str | os.PathLike,
    subfolder: str | None = None,
    config: PeftConfig | None = None,
    hub: dict[str, Any] | None = None,
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's (or hub repo's) config (unless given) and weights, read as one consistent pair.

    The folder is read under a shared lock, so a concurrent save (which holds it exclusively) is never seen
    half-way: the config and the weights come from the same save. From the hub, the weights are fetched at the
    commit the config came from, so a push between the two downloads cannot pair them wrongly. The ranks the
    config asks for are checked against the file's tensors before anything is built from them (the config's
    ``check_file``).

    Args:
        hub: for a hub repo id, the hub options (:func:`lorakit.io.hub_options`: revision, token, cache_dir,
            local_files_only); ignored for a local folder, as in PEFT.

    Raises:
        AdapterFileError: missing, unreadable or corrupt files.
        ConfigError: an invalid config.
        ShapeMismatchError: the config's ranks disagree with the file's tensors.
    """
    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    with reading_folder(folder):
        if config is None:
            file = resolve_adapter_file(path, CONFIG_NAME, subfolder=subfolder, hub=hub)
            config = PeftConfig.from_dict(read_json(file))
            commit = None if is_local_path(path) else hub_snapshot(file)
            if commit is not None:
                hub = {**(hub or {}), "revision": commit}
        state = read_adapter_weights(path, subfolder=subfolder, hub=hub)
    config.check_file(state)
    return config, state


def _peft_alias(key: str, adapter_name: str) -> str:
    """PEFT's ``bias="all"`` files also hold ``<m>.modules_to_save.bias`` (no adapter name): name it."""
    head, sep, tail = key.partition(".modules_to_save.")
    return f"{head}{sep}{adapter_name}.{tail}" if sep else key


def _base_tensors(tuner: BaseTuner) -> dict[str, torch.Tensor]:
    """File key -> tensor for every parameter and buffer of the model (a tied weight answers to each name)."""
    model, prefix = tuner.model, _prefix(tuner)
    out = {module_key("", n, prefix): p for n, p in model.named_parameters(remove_duplicate=False)}
    for n, b in model.named_buffers(remove_duplicate=False):
        out.setdefault(module_key("", n, prefix), b)
    return out


class StateMatch(NamedTuple):
    """Where each tensor of a file (or state dict) goes in one adapter, checked; nothing is written yet.

    Attributes:
        copies: ``(destination, source)`` for every tensor that fits.
        needed: how many tensors the adapter must get (its factors, module copies and own tensors).
        missing: file keys of those the state lacks.
        unexpected: keys of the state that match nothing.
        refusals: in the state's order, an error for each tensor that must not be loaded: a base tensor the
            adapter does not own (:class:`AdapterFileError`) or a shape that differs from the model's
            (:class:`ShapeMismatchError`).
        mismatched: the keys behind the shape refusals.
    """

    copies: list[tuple[torch.Tensor, torch.Tensor]]
    needed: int
    missing: list[str]
    unexpected: list[str]
    refusals: list[Exception]
    mismatched: list[str]


def match_adapter_state(tuner: BaseTuner, adapter_name: str, state: dict[str, Any]) -> StateMatch:
    """Match a file's tensors (file keys, see the module docstring) against adapter ``adapter_name``."""
    required = required_keys(tuner, adapter_name, loading=True)
    # What the adapter owns: factors, DoRA magnitudes, modules_to_save copies, the biases its config trains, the
    # tuner's own tensors (a prompt) and (PEFT's resized-vocabulary files) the embedding weights. Nothing else of
    # the base may be written.
    owned = adapter_tensors(tuner, adapter_name, save_embedding_layers=True, loading=True)
    owned_ids = {id(t) for t in owned.values()}
    base = _base_tensors(tuner)
    if getattr(tuner.peft_config[adapter_name], "bias", "none") == "all":  # every bias, inside wrappers too (PEFT)
        owned_ids.update(id(t) for k, t in base.items() if k.rsplit(".", 1)[-1] == "bias")
    match = StateMatch([], len(required), [k for k in required if k not in state], [], [], [])
    for key, tensor in state.items():
        dest = owned.get(key)
        if dest is None:  # a state-dict name (PEFT's bias="all" files also name the copies' biases so)
            dest = base.get(key, base.get(_peft_alias(key, adapter_name)))
            if dest is not None and id(dest) not in owned_ids:
                match.refusals.append(
                    AdapterFileError(
                        f"the adapter file holds {key!r}, a tensor of the base model that this adapter does not own; "
                        "an adapter file may only set its own factors, DoRA magnitudes, modules_to_save copies and the "
                        "biases its config trains (bias='all' or 'lora_only'). Nothing was loaded"
                    )
                )
                continue
        if dest is None:
            match.unexpected.append(key)
        elif tuple(dest.shape) != tuple(tensor.shape):
            match.mismatched.append(key)
            match.refusals.append(
                ShapeMismatchError(
                    f"adapter tensor {key!r} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(dest.shape)}; the adapter was trained on a different base model or rank"
                )
            )
        else:
            match.copies.append((dest, tensor))
    return match


def copy_adapter_state(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write matched tensors into the model (:func:`match_adapter_state`'s ``copies``)."""
    with torch.no_grad():
        for dest, tensor in copies:
            dest.copy_(tensor)


def load_adapter_state(tuner: BaseTuner, adapter_name: str, state: dict[str, Any]) -> None:
    """Copy a file's tensors into adapter ``adapter_name``; all checks happen before any tensor is written.

    Raises:
        AdapterFileError: the file lacks tensors the adapter needs, holds tensors that match no module, or holds
            a base tensor the adapter does not own (a base weight, a buffer such as rotary ``inv_freq``).
        ShapeMismatchError: a tensor's shape differs from the model's; names the first such key.
    """
    match = match_adapter_state(tuner, adapter_name, state)
    if match.missing:
        raise AdapterFileError(
            f"the adapter file lacks {len(match.missing)} of the {match.needed} tensors this adapter needs, first "
            f"{match.missing[0]!r}; was it saved for another model or with other target_modules?"
        )
    if match.refusals:
        raise match.refusals[0]
    if match.unexpected:
        raise AdapterFileError(
            f"the adapter file holds {len(match.unexpected)} tensors that match no module of this model, first "
            f"{match.unexpected[0]!r}; was it saved for another base model?"
        )
    copy_adapter_state(match.copies)
