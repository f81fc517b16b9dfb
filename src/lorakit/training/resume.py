"""Resuming from a checkpoint: every file checked first, then loaded into the model, optimizer, scheduler and RNGs.

A checkpoint may come from anywhere (another machine, a colleague, a download), so nothing in it is trusted:

* :func:`read_checkpoint` reads the files of the format described in :mod:`lorakit.training.checkpoint` with
  ``json`` and safetensors only — no pickle, so no code runs — and checks each on its own: the JSON's fields
  and types, the loss history, Python's and torch's RNG states (dtype, shape, length), that every tensor of
  ``trainer_state.safetensors`` belongs somewhere, and that the adapter holds finite floating-point weights
  (a checkpoint of a diverged run is refused);
* :func:`restore_checkpoint` checks what was read against the live objects — the optimizer's parameter
  groups and, per parameter, the names, dtypes and shapes of its state (torch's AdamW, bitsandbytes' 8-bit and
  paged optimizers), the scheduler's state dict key by key, the adapter's keys and shapes — and only then
  loads all of it.

Anything wrong is one :class:`~lorakit.errors.AdapterFileError` naming the file and what is wrong, and the
model, optimizer, scheduler and RNGs are left as they were.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorakit.errors import AdapterFileError, ConfigError, LorakitError
from lorakit.persistence import adapter_tensors, load_adapter_state
from lorakit.training.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    STATE_VERSION,
    refuse_old_format,
    rng_state,
    set_rng_state,
)
from lorakit.training.precision import check_scaler_state

#: The key bitsandbytes' 8-bit optimizers wrap their quantization tensors in (``Optimizer8bit.state_dict``).
_BNB_WRAPPED = "__bnb_optimizer_quant_state__"
_BNB_BLOCK = 256  # bitsandbytes' block size for the absmax of 8-bit optimizer state
_MT_WORDS = 625  # Python's Mersenne Twister state: 624 words + the position


class _Invalid(Exception):
    """What is wrong with a checkpoint file (turned into an AdapterFileError naming the file)."""


@dataclass
class TrainerState:
    """A checkpoint read and checked by :func:`read_checkpoint`; nothing of it is loaded anywhere yet.

    Attributes:
        folder: the checkpoint folder.
        step: optimizer steps done.
        info: ``settings`` (the run facts that must not change), ``history`` (loss per step so far) and, for
            fp16 runs, ``grad_scaler`` (the loss scale's state).
        adapter: the adapter's tensors (file keys), all finite floating point.
        optimizer: ``{"param_groups": [...], "state": {index: {...}}}`` in ``Optimizer.state_dict()`` form.
        scheduler: the LR scheduler's state dict.
        rng: per process, ``{"python": random state, "torch": ByteTensor, "cuda": [ByteTensor, ...]}``.
    """

    folder: Path
    step: int
    info: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]


# -- reading the files ------------------------------------------------------------------------------------


def read_checkpoint(folder: Path) -> TrainerState:
    """Read and check the files of checkpoint ``folder`` (JSON and safetensors only; nothing is unpickled).

    Raises:
        AdapterFileError: a missing, empty, truncated, foreign or inconsistent file, or an old pickle-based
            checkpoint (not opened); the message names the file and what is wrong.
    """
    folder = Path(folder)
    refuse_old_format(folder)
    if not folder.is_dir():
        raise AdapterFileError(f"checkpoint {folder} is not a folder")

    doc = _read_json(folder / STATE_JSON)
    with _naming(folder / STATE_JSON):
        step, info, scheduler, groups, state_json, python_rng = _check_state_doc(doc)
    tensors = _read_tensors(folder / STATE_TENSORS, expect_format=True)
    with _naming(folder / STATE_TENSORS):
        optim_state, rng_tensors = _place_tensors(tensors, state_json, len(python_rng))
    rng = [{"python": py, **rng_tensors[rank]} for rank, py in enumerate(python_rng)]

    config = _read_json(folder / ADAPTER_CONFIG)
    with _naming(folder / ADAPTER_CONFIG):
        if not isinstance(config, dict) or not isinstance(config.get("r"), int):
            raise _Invalid("is not an adapter config (a JSON object with an integer 'r')")
    adapter = _read_tensors(folder / ADAPTER_WEIGHTS, expect_format=False)
    with _naming(folder / ADAPTER_WEIGHTS):
        if not adapter:
            raise _Invalid("holds no tensors")
        for key, t in adapter.items():
            if not t.is_floating_point():
                raise _Invalid(f"tensor {key!r} is {t.dtype}, not floating point")
            if not bool(torch.isfinite(t).all()):
                raise _Invalid(
                    f"holds non-finite adapter weights (NaN or Inf) in {key!r}: the run had diverged by this "
                    "step; resume from an earlier checkpoint or start again"
                )
    return TrainerState(folder, step, info, adapter, {"param_groups": groups, "state": optim_state}, scheduler, rng)


@contextlib.contextmanager
def _naming(file: Path) -> Iterator[None]:
    """Turn an :class:`_Invalid` raised inside into an AdapterFileError naming ``file``."""
    try:
        yield
    except _Invalid as exc:
        raise AdapterFileError(f"checkpoint file {file}: {exc}") from None


def _read_json(file: Path) -> Any:
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise AdapterFileError(f"checkpoint file {file} is missing; the checkpoint is incomplete") from None
    except UnicodeDecodeError:
        raise AdapterFileError(
            f"checkpoint file {file} is not UTF-8 text, so not JSON; is it a foreign file?"
        ) from None
    except OSError as exc:
        raise AdapterFileError(f"checkpoint file {file} is unreadable: {exc.strerror or exc}") from None
    if not text.strip():
        raise AdapterFileError(f"checkpoint file {file} is empty")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"checkpoint file {file} is not valid JSON (truncated or corrupt): {exc}") from None


def _read_tensors(file: Path, expect_format: bool) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise AdapterFileError(f"checkpoint file {file} is missing; the checkpoint is incomplete")
    if file.stat().st_size == 0:
        raise AdapterFileError(f"checkpoint file {file} is empty")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors' own errors, OSError, MemoryError on an absurd header...
        raise AdapterFileError(
            f"checkpoint file {file} is not a readable safetensors file (truncated, corrupt or foreign): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if expect_format and (metadata.get("format") != FORMAT or metadata.get("version") != str(STATE_VERSION)):
        raise AdapterFileError(
            f"checkpoint file {file} is not lorakit trainer state version {STATE_VERSION} (its metadata says "
            f"format {metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    return tensors


def _check_state_doc(doc: Any) -> tuple[int, dict, dict, list, dict, list]:
    if not isinstance(doc, dict):
        raise _Invalid(f"holds a JSON {type(doc).__name__}, not an object; it is not lorakit trainer state")
    if doc.get("format") != FORMAT:
        raise _Invalid(f"is not lorakit trainer state (format {doc.get('format')!r}, expected {FORMAT!r})")
    if doc.get("version") != STATE_VERSION:
        raise _Invalid(f"has trainer state version {doc.get('version')!r}; this lorakit reads version {STATE_VERSION}")
    step = _field(doc, "step", int)
    if step < 1:
        raise _Invalid(f"'step' is {step}, expected a positive number of optimizer steps")
    settings = _field(doc, "settings", dict)
    history = _field(doc, "history", list)
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or entry.get("step") != i + 1 or not _finite_number(entry.get("loss")):
            raise _Invalid(f"'history' entry {i} is not {{'step': {i + 1}, 'loss': <finite number>, ...}}")
    if len(history) != step:
        raise _Invalid(f"'history' has {len(history)} entries for step {step}")
    scheduler = _field(doc, "scheduler", dict)
    optimizer = _field(doc, "optimizer", dict)
    groups = _field(optimizer, "param_groups", list, "optimizer.")
    state = _field(optimizer, "state", dict, "optimizer.")
    for index, entry in state.items():
        if not re.fullmatch(r"[0-9]+", index) or not isinstance(entry, dict):
            raise _Invalid(f"'optimizer.state' entry {index!r} is not a parameter index with a state object")
    if "grad_scaler" in doc:  # fp16 runs: the loss scale and its growth counter
        try:
            scaler = check_scaler_state(doc["grad_scaler"])
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    rng = _field(doc, "rng", list)
    if not rng:
        raise _Invalid("'rng' is empty: no process's random state")
    python = []
    for rank, entry in enumerate(rng):
        if not isinstance(entry, dict) or set(entry) != {"python"}:
            raise _Invalid(f"'rng' entry {rank} is not {{'python': [...]}}")
        python.append(_python_rng(entry["python"], rank))
    info = {"settings": settings, "history": history}
    if "grad_scaler" in doc:
        info["grad_scaler"] = scaler
    return step, info, scheduler, groups, state, python


_JSON_KINDS = {dict: "an object", list: "a list", int: "an integer", float: "a number", str: "a string"}


def _field(doc: dict, key: str, kind: type, prefix: str = "") -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = "missing" if key not in doc else _JSON_KINDS.get(type(value), json.dumps(value))
        raise _Invalid(f"'{prefix}{key}' is {got}, expected {_JSON_KINDS[kind]}")
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _python_rng(value: Any, rank: int) -> tuple:
    """``[3, [625 words], gauss_next]`` as ``random.setstate`` takes it, after checking every part."""
    ok = isinstance(value, list) and len(value) == 3 and value[0] == 3 and isinstance(value[1], list)
    ok = ok and len(value[1]) == _MT_WORDS
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2**32 for w in value[1])
    ok = ok and value[1][-1] <= _MT_WORDS - 1 and (value[2] is None or _finite_number(value[2]))
    if not ok:
        raise _Invalid(f"'rng' entry {rank}: Python's random state is not [3, [{_MT_WORDS} words], gauss_next]")
    gauss = None if value[2] is None else float(value[2])
    return (3, tuple(value[1]), gauss)


_TENSOR_KEY = re.compile(r"optimizer\.state\.([0-9]+)\.(.+)|rng\.([0-9]+)\.(torch|cuda\.([0-9]+))", re.DOTALL)


def _place_tensors(
    tensors: dict[str, torch.Tensor], state_json: dict[str, Any], processes: int
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Put each tensor of the trainer-state file where its key says; check the RNG states' form."""
    state = {int(i): copy.deepcopy(s) for i, s in state_json.items()}
    rng: list[dict[str, Any]] = [{"cuda": {}} for _ in range(processes)]
    for key, tensor in tensors.items():
        m = _TENSOR_KEY.fullmatch(key)
        if m is None:
            raise _Invalid(f"holds tensor {key!r}, which is neither optimizer nor RNG state")
        if m.group(1) is not None:
            index, path = int(m.group(1)), m.group(2).split(".")
            if index not in state:
                raise _Invalid(f"holds {key!r} for parameter {index}, which {STATE_JSON} lists no state for")
            node = state[index]
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise _Invalid(f"tensor {key!r} collides with a value of {STATE_JSON}")
            if path[-1] in node:
                raise _Invalid(f"tensor {key!r} collides with a value of {STATE_JSON}")
            node[path[-1]] = tensor
            continue
        rank = int(m.group(3))
        if rank >= processes:
            raise _Invalid(f"holds {key!r}, but {STATE_JSON} has RNG states for {processes} processes")
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise _Invalid(f"RNG state {key!r} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, not bytes")
        if m.group(4) == "torch":
            expected = torch.get_rng_state().numel()
            if tensor.numel() != expected:
                raise _Invalid(f"RNG state {key!r} has {tensor.numel()} bytes; torch's CPU generator has {expected}")
            rng[rank]["torch"] = tensor
        else:
            rng[rank]["cuda"][int(m.group(5))] = tensor
    for rank, entry in enumerate(rng):
        if "torch" not in entry:
            raise _Invalid(f"lacks 'rng.{rank}.torch', process {rank}'s torch RNG state")
        cuda = entry["cuda"]
        if sorted(cuda) != list(range(len(cuda))):
            raise _Invalid(f"process {rank}'s CUDA RNG states are not numbered 0..{len(cuda) - 1}")
        entry["cuda"] = [cuda[i] for i in range(len(cuda))]
    return state, rng


# -- restoring --------------------------------------------------------------------------------------------


def restore_checkpoint(
    state: TrainerState,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    adapter_name: str = "default",
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Load a checked checkpoint into ``model``, ``optimizer``, ``scheduler`` and this process's RNGs.

    Everything is checked against the objects first (the optimizer state against the trainable parameters,
    the scheduler state against the scheduler's, the adapter against the model); if anything does not fit,
    nothing is changed.

    Args:
        place: ``place(live, whole)`` turns a whole tensor of the checkpoint into what is loaded into the live
            parameter (or its optimizer state) of the same shape: under FSDP, this process's shard
            (:func:`lorakit.training.fsdp.place_like`). None: the whole tensor.

    Raises:
        AdapterFileError: naming the checkpoint file whose content does not fit, and how.
    """
    tensors_file, json_file = state.folder / STATE_TENSORS, state.folder / STATE_JSON
    if not 0 <= rank < len(state.rng):
        raise AdapterFileError(f"checkpoint file {json_file}: no RNG state for process {rank}")
    with _naming(json_file):
        groups, params = _fit_param_groups(state.optimizer["param_groups"], optimizer)
        sched_state = _like(state.scheduler, scheduler.state_dict(), "scheduler")
    with _naming(tensors_file):
        optim_state = {"param_groups": groups, "state": _fit_param_states(state.optimizer["state"], optimizer, params)}
        if place is not None:
            optim_state["state"] = {i: _placed(params[i][0], s, place) for i, s in optim_state["state"].items()}
        rng = state.rng[rank]
        if rng["cuda"] and torch.cuda.is_available():
            if len(rng["cuda"]) > torch.cuda.device_count():
                raise _Invalid(f"holds {len(rng['cuda'])} CUDA RNG states; this machine has fewer devices")
            for i, t in enumerate(rng["cuda"]):
                if t.numel() != torch.cuda.get_rng_state(i).numel():
                    raise _Invalid(f"'rng.{rank}.cuda.{i}' is not a CUDA generator state of this torch")

    trainable = [p for p in model.parameters() if p.requires_grad]
    saved_params = [p.detach().clone() for p in trainable]
    saved_optim, saved_sched = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
    saved_rng = rng_state()
    adapter = state.adapter
    if place is not None:
        live = adapter_tensors(model.base_model, adapter_name, save_embedding_layers=True, loading=True)
        adapter = _placed_by_key(live, adapter, place)
    try:
        load_adapter_state(model.base_model, adapter_name, adapter)  # checks keys and shapes before writing
    except LorakitError as exc:
        raise AdapterFileError(
            f"checkpoint file {state.folder / ADAPTER_WEIGHTS} does not fit this model: {exc}"
        ) from None
    try:
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(sched_state)
        set_rng_state(rng)
    except Exception as exc:  # checked above, so not expected: put everything back all the same
        with torch.no_grad():
            for p, before in zip(trainable, saved_params):
                p.copy_(before)
        optimizer.load_state_dict(saved_optim)
        scheduler.load_state_dict(saved_sched)
        set_rng_state(saved_rng)
        raise AdapterFileError(f"checkpoint {state.folder} could not be restored: {type(exc).__name__}: {exc}") from exc


def _placed(param: torch.Tensor, entry: dict[str, Any], place: Callable) -> dict[str, Any]:
    """An optimizer state whose tensors of the parameter's shape (AdamW's moments) are placed like it."""
    return {
        k: place(param, v) if isinstance(v, torch.Tensor) and v.shape == param.shape else v for k, v in entry.items()
    }


def _placed_by_key(live: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], place: Callable) -> dict:
    """Adapter tensors placed like the live tensors of the same key and shape (others left for the checks)."""
    return {k: place(live[k], t) if k in live and live[k].shape == t.shape else t for k, t in saved.items()}


def load_checkpoint(
    folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> TrainerState:
    """:func:`read_checkpoint` then :func:`restore_checkpoint`; returns what was read (``step``, ``info``)."""
    state = read_checkpoint(folder)
    restore_checkpoint(state, model, optimizer, scheduler, rank)
    return state


def _like(saved: Any, reference: Any, where: str) -> Any:
    """``saved`` (JSON data) in the shape of ``reference``: same keys, lengths and kinds of value, or _Invalid.

    Lists become tuples where the reference has tuples (an optimizer's ``betas``).
    """
    if isinstance(reference, dict):
        if not isinstance(saved, dict) or set(saved) != set(reference):
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise _Invalid(f"'{where}' holds {keys}, expected the keys {sorted(reference)}")
        return {k: _like(saved[k], reference[k], f"{where}.{k}") for k in reference}
    if isinstance(reference, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(reference):
            raise _Invalid(f"'{where}' is not a list of {len(reference)} values")
        items = [_like(s, r, f"{where}.{i}") for i, (s, r) in enumerate(zip(saved, reference))]
        return tuple(items) if isinstance(reference, tuple) else items
    if isinstance(reference, bool) or reference is None or isinstance(reference, str):
        if type(saved) is not type(reference):
            raise _Invalid(f"'{where}' is {saved!r}, expected a {type(reference).__name__}")
        return saved
    if isinstance(reference, int):
        if not _finite_number(saved) or saved != int(saved):
            raise _Invalid(f"'{where}' is {saved!r}, expected an integer")
        return int(saved)
    if isinstance(reference, float):
        if not _finite_number(saved):
            raise _Invalid(f"'{where}' is {saved!r}, expected a finite number")
        return saved
    raise _Invalid(f"'{where}' cannot be restored (this run holds a {type(reference).__name__} there)")


def _fit_param_groups(saved: list[Any], optimizer: torch.optim.Optimizer) -> tuple[list[dict[str, Any]], dict]:
    """The saved ``param_groups`` checked against ``optimizer``'s, and ``{index: (parameter, its group)}``."""
    reference = optimizer.state_dict()["param_groups"]
    groups = _like(saved, reference, "optimizer.param_groups")
    params: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    for group, ref, live in zip(groups, reference, optimizer.param_groups):
        if group["params"] != ref["params"]:
            raise _Invalid("the optimizer's parameter groups hold other parameters than this run's")
        params.update((i, (p, live)) for i, p in zip(ref["params"], live["params"]))
    return groups, params


def _fit_param_states(
    saved: dict[int, dict[str, Any]], optimizer: torch.optim.Optimizer, params: dict
) -> dict[int, dict[str, Any]]:
    """The saved per-parameter states, each checked against its parameter (names, dtypes, shapes, finite)."""
    for index, entry in saved.items():
        if index not in params:
            raise _Invalid(f"holds optimizer state for parameter {index}; this run has {len(params)} parameters")
        param, group = params[index]
        _check_param_state(optimizer, param, group, entry, f"optimizer.state.{index}")
    return saved


def _check_param_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict[str, Any], entry: dict[str, Any], where: str
) -> None:
    """One parameter's optimizer state has the names, dtypes and shapes this optimizer keeps for it."""
    shape = tuple(param.shape)

    def tensor(name: str, node: dict[str, Any], shapes: tuple[tuple[int, ...], ...] | None, dtypes: tuple) -> None:
        """``node[name]`` is a tensor of one of ``shapes`` (None: any 1-D) and ``dtypes`` (empty: any float)."""
        t = node.get(name)
        if not isinstance(t, torch.Tensor):
            raise _Invalid(f"'{where}.{name}' is missing or not a tensor")
        shape_ok = t.dim() == 1 if shapes is None else tuple(t.shape) in shapes
        if not shape_ok or (t.dtype not in dtypes if dtypes else not t.is_floating_point()):
            expected = "a vector" if shapes is None else " or ".join(str(s) for s in shapes)
            raise _Invalid(
                f"'{where}.{name}' is a {t.dtype} tensor of shape {tuple(t.shape)}; for this parameter of shape "
                f"{shape} the optimizer keeps {expected}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _Invalid(f"'{where}.{name}' holds NaN or Inf: the run had diverged by this step")

    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        names = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        if set(entry) != names:
            raise _Invalid(f"'{where}' holds {sorted(entry)}; AdamW keeps {sorted(names)}")
        tensor("step", entry, ((),), ())
        for name in names - {"step"}:
            tensor(name, entry, (shape,), ())
        return
    if hasattr(optimizer, "non_castable_tensor_keys"):  # bitsandbytes' 8-bit / paged optimizers
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise _Invalid(f"'{where}.step' is {step!r}, expected a count of steps")
        if _BNB_WRAPPED in entry:  # newer bitsandbytes wrap the quantization state (for FSDP)
            quant, where = entry[_BNB_WRAPPED], f"{where}.{_BNB_WRAPPED}"
            if set(entry) != {"step", _BNB_WRAPPED} or not isinstance(quant, dict):
                raise _Invalid(f"'{where}' is not bitsandbytes' optimizer state")
        else:
            quant = {k: v for k, v in entry.items() if k != "step"}
        if "state1" not in quant or set(quant) - set(optimizer.non_castable_tensor_keys):
            raise _Invalid(f"'{where}' holds {sorted(quant)}, not bitsandbytes' optimizer state")
        blocks = (param.numel() + _BNB_BLOCK - 1) // _BNB_BLOCK
        for name in quant:
            if name in ("state1", "state2"):
                tensor(name, quant, (shape,), (torch.uint8, torch.float32))
            elif name.startswith("qmap"):
                tensor(name, quant, ((256,),), (torch.float32,))
            elif name.startswith("absmax"):
                tensor(name, quant, ((blocks,),), (torch.float32,))
            else:  # unorm_vec, gnorm_vec, max1, ...: small float32 vectors
                tensor(name, quant, None, (torch.float32,))
        return
    raise _Invalid(f"holds state of a {type(optimizer).__name__}, which lorakit cannot check, so does not resume")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: list[str]) -> None:
    """Refuse to resume when a setting that changes the result differs from the checkpoint's.

    Raises:
        ConfigError: naming every differing setting with both values.
    """
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigError(
            "cannot resume: these settings differ from the checkpoint's, so the run would not continue to the "
            "same result (use the same settings, or start a new run in another --output):\n  " + "\n  ".join(diffs)
        )
