"""Training checkpoints: everything needed to continue a run to the same result as if it never stopped.

A checkpoint is a folder ``<output>/checkpoints/step-00000050/`` holding

* ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter at that step, in PEFT's format
  (loadable on its own by lorakit or PEFT);
* ``trainer_state.pt``: optimizer and LR-scheduler state, and the random-number-generator states of every
  process (Python, torch CPU, torch CUDA) — so dropout masks after a resume are the ones an uninterrupted
  run would have drawn;
* ``trainer_state.json``: the step, the run's settings that must not change on resume, and the loss
  history so far (human-readable).

The data order needs no state: epoch ``e`` is shuffled by a generator seeded with ``seed + e``, so a
resumed run skips to the same position. Each checkpoint folder is written to a hidden temporary folder and
renamed into place (:func:`lorakit.io.atomic_write_dir`): an interrupted save leaves the previous
checkpoints intact and never a half checkpoint that a resume would pick up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io import atomic_write_dir
from lorakit.persistence import load_adapter_state, read_adapter_weights

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's random generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output: Path, step: int) -> Path:
    return Path(output) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output`` as ``(step, folder)``, oldest first (hidden temp folders ignored)."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "trainer_state.pt").is_file() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


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
        info: JSON-serialisable run facts (settings, loss history) stored in ``trainer_state.json``.
    """
    target = checkpoint_dir(output, step)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        torch.save(
            {
                "version": STATE_VERSION,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_states,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **info}, indent=2, sort_keys=True))

    atomic_write_dir(target, fill)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def find_resume_checkpoint(output: Path, resume: str | bool) -> Path:
    """The folder to resume from: ``resume`` itself if it is a checkpoint folder, else the newest under ``output``.

    Raises:
        AdapterFileError: nothing to resume from (the message says where it looked).
    """
    if isinstance(resume, str) and resume not in ("", "latest", "true", "True"):
        path = Path(resume).expanduser()
        if (path / "trainer_state.pt").is_file():
            return path
        found = list_checkpoints(path)
        if found:
            return found[-1][1]
        raise AdapterFileError(
            f"--resume {resume!r}: no checkpoint there (a checkpoint folder holds trainer_state.pt; "
            f"an output folder holds {CHECKPOINTS}/step-N/)"
        )
    found = list_checkpoints(output)
    if not found:
        raise AdapterFileError(
            f"--resume: no checkpoint in {Path(output) / CHECKPOINTS}; start without --resume, "
            f"or pass --resume PATH to a checkpoint folder"
        )
    return found[-1][1]


def load_checkpoint(folder: Path, model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """Load the adapter weights of checkpoint ``folder`` into ``model`` and return its trainer state.

    The returned dict has ``step``, ``optimizer``, ``scheduler``, ``rng`` (per process) and ``info`` (the
    JSON facts). The caller restores optimizer and scheduler (it owns them).
    """
    folder = Path(folder)
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
        info = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"checkpoint {folder} is unreadable: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise AdapterFileError(f"checkpoint {folder} has state version {state.get('version')}, expected 1")
    load_adapter_state(model.base_model, adapter_name, read_adapter_weights(folder))
    state["info"] = info
    return state


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
