"""Training checkpoints: everything needed to continue a run to the same result as if it never stopped.

A checkpoint is a folder ``<output>/checkpoints/step-00000050/`` of JSON and safetensors files only, so
reading one never runs code (a pickle, which ``torch.load`` reads, can run any code it names):

* ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter at that step, in PEFT's format
  (loadable on its own by lorakit or PEFT);
* ``trainer_state.json``: ``format`` and ``version`` (:data:`STATE_VERSION`), the ``step``, the run's
  ``settings`` that must not change on resume, the loss ``history`` so far, the LR ``scheduler``'s state dict,
  the ``optimizer``'s ``param_groups`` and the non-tensor part of its per-parameter ``state`` (keyed by the
  parameter's index, as in ``Optimizer.state_dict()``), and ``rng``: per process, Python's ``random`` state as
  ``[version, [625 words], gauss_next]``; for fp16 runs (loss scaling), ``grad_scaler``: the
  ``torch.amp.GradScaler`` state (scale, growth and backoff factors, growth interval and tracker);
* ``trainer_state.safetensors``: the tensors — optimizer state under ``optimizer.state.<index>.<name>``
  (nested dicts, such as bitsandbytes' wrapped quantization state, add a level per key:
  ``optimizer.state.3.__bnb_optimizer_quant_state__.absmax1``), and process ``r``'s torch RNG state under
  ``rng.<r>.torch`` and its CUDA ones under ``rng.<r>.cuda.<device>`` — so dropout masks after a resume are
  the ones an uninterrupted run would have drawn.

Reading one back is :mod:`lorakit.training.resume`'s job: every file is checked before any of it is used, and
checkpoints of lorakit's first format (``trainer_state.pt``, a pickle) are refused without being opened.

The data order needs no state: epoch ``e`` is shuffled by a generator seeded with ``seed + e``, so a
resumed run skips to the same position. Each checkpoint folder is written to a hidden temporary folder and
renamed into place (:func:`lorakit.io.atomic_write_dir`): an interrupted save leaves the previous
checkpoints intact and never a half checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import lorakit.io as lorakit_io
from lorakit.errors import AdapterFileError
from lorakit.io import atomic_write_dir

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: 1: ``trainer_state.pt`` (a pickle; no longer read). 2: JSON + safetensors.
STATE_VERSION = 2
FORMAT = "lorakit-trainer-state"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The pickle of format 1: recognised by name only, never opened.
OLD_STATE = "trainer_state.pt"


# -- random generators ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's random generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- finding checkpoints ----------------------------------------------------------------------------------


def checkpoint_dir(output: Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step:08d}"


def _step_dirs(output: Path) -> list[tuple[int, Path]]:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _is_complete(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def _is_old_format(folder: Path) -> bool:
    return (folder / OLD_STATE).exists() and not (folder / STATE_TENSORS).exists()


def refuse_old_format(folder: Path) -> None:
    """Refuse a checkpoint of the first, pickle-based format (by its file name; the file is never opened).

    Raises:
        AdapterFileError: ``folder`` holds ``trainer_state.pt`` and no ``trainer_state.safetensors``.
    """
    if _is_old_format(folder):
        raise _old_format_error(folder)


def _old_format_error(folder: Path) -> AdapterFileError:
    return AdapterFileError(
        f"checkpoint {folder} is an old pickle-based checkpoint ({OLD_STATE}); lorakit no longer reads those, "
        f"for safety (unpickling a file can run any code in it). It was not opened. Start the run again "
        f"without --resume (or with --overwrite)"
    )


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output`` as ``(step, folder)``, oldest first (hidden temp folders ignored)."""
    return [(step, folder) for step, folder in _step_dirs(output) if _is_complete(folder)]


def find_resume_checkpoint(output: Path, resume: str | bool) -> Path:
    """The folder to resume from: ``resume`` itself if it is a checkpoint folder, else the newest under ``output``.

    Raises:
        AdapterFileError: nothing to resume from (the message says where it looked), or the checkpoint is of
            the old pickle-based format.
    """
    if isinstance(resume, str) and resume not in ("", "latest", "true", "True"):
        path = Path(resume).expanduser()
        if _is_old_format(path):
            raise _old_format_error(path)
        if (path / STATE_JSON).is_file() or (path / STATE_TENSORS).is_file():
            return path  # a half checkpoint is reported by read_checkpoint, naming the missing file
        found = [(s, f) for s, f in _step_dirs(path) if _is_complete(f) or _is_old_format(f)]
        if found:
            if _is_old_format(found[-1][1]):
                raise _old_format_error(found[-1][1])
            return found[-1][1]
        raise AdapterFileError(
            f"--resume {resume!r}: no checkpoint there (a checkpoint folder holds {STATE_JSON} and "
            f"{STATE_TENSORS}; an output folder holds {CHECKPOINTS}/step-N/)"
        )
    found = [(s, f) for s, f in _step_dirs(output) if _is_complete(f) or _is_old_format(f)]
    if not found:
        raise AdapterFileError(
            f"--resume: no checkpoint in {Path(output) / CHECKPOINTS}; start without --resume, "
            f"or pass --resume PATH to a checkpoint folder"
        )
    if _is_old_format(found[-1][1]):
        raise _old_format_error(found[-1][1])
    return found[-1][1]


# -- writing ----------------------------------------------------------------------------------------------


def save_checkpoint(
    output: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: list[dict[str, Any]],
    info: dict[str, Any],
    keep: int | None = 2,
) -> Path:
    """Write the checkpoint for ``step`` atomically and keep only the newest ``keep`` ones.

    Args:
        model: the lorakit ``PeftModel`` (its adapters are saved with ``save_pretrained``).
        rng_states: one :func:`rng_state` per process, in rank order.
        info: JSON-serialisable run facts (``settings``, ``history``) stored in ``trainer_state.json``.
    """
    target = checkpoint_dir(output, step)
    tensors: dict[str, torch.Tensor] = {}
    optim = optimizer.state_dict()
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": STATE_VERSION,
        "step": step,
        **info,
        "scheduler": _plain(scheduler.state_dict(), "scheduler"),
        "optimizer": {
            "param_groups": _plain(optim["param_groups"], "optimizer.param_groups"),
            "state": {str(i): _split(s, f"optimizer.state.{i}", tensors) for i, s in optim["state"].items()},
        },
        "rng": [],
    }
    for rank, state in enumerate(rng_states):
        version, words, gauss = state["python"]
        doc["rng"].append({"python": [version, list(words), gauss]})
        tensors[f"rng.{rank}.torch"] = state["torch"]
        for i, cuda in enumerate(state.get("cuda") or []):
            tensors[f"rng.{rank}.cuda.{i}"] = cuda
    # safetensors refuses shared memory (bitsandbytes shares one qmap among parameters): a copy per key
    tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": FORMAT, "version": str(STATE_VERSION)})
        (tmp / STATE_JSON).write_text(_dumps(doc), encoding="utf-8")

    atomic_write_dir(target, fill)
    root = Path(output) / CHECKPOINTS
    # what killed saves or deletions left (the run holds --output's lock: no other writer is at work here)
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(output)[:-keep]:
            # renamed aside first: a kill mid-deletion leaves a hidden folder, never a half checkpoint by its name
            aside = root / f".{old.name}.old-deleting"
            os.replace(old, aside)
            lorakit_io.crash_point("old checkpoint aside")
            shutil.rmtree(aside, ignore_errors=True)
    return target


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists); anything else is a bug worth a clear message."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"cannot store {where} ({type(value).__name__}) in a checkpoint: not JSON data")


def _split(state: dict[Any, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A per-parameter optimizer state with its tensors moved to ``tensors`` under ``prefix.<key>``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or "." in key or not key:
            raise TypeError(f"cannot store optimizer state key {key!r} of {prefix} in a checkpoint")
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}.{key}"] = value
        elif isinstance(value, dict):
            out[key] = _split(value, f"{prefix}.{key}", tensors)
        else:
            out[key] = _plain(value, f"{prefix}.{key}")
    return out


def _dumps(value: Any, depth: int = 0) -> str:
    """Indented JSON (keys in the order given) where a list or object of plain values takes one line."""
    nested = isinstance(value, (dict, list)) and any(isinstance(v, (dict, list)) for v in _children(value))
    if not nested:
        return json.dumps(value) + ("\n" if depth == 0 else "")
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        text = "{\n" + ",\n".join(items) + f"\n{end}}}"
    else:
        text = "[\n" + ",\n".join(pad + _dumps(v, depth + 1) for v in value) + f"\n{end}]"
    return text + ("\n" if depth == 0 else "")


def _children(value: dict | list) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else value
