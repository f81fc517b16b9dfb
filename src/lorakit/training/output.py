"""What ``lorakit train`` may do to its ``--output`` folder: the files it writes there, and the checks before it does.

A run replaces only what lorakit writes (:data:`OUTPUT_NAMES`), and only when asked (``--overwrite``) or when
continuing its own run (``--resume``); it never writes into a folder that is or holds one of its inputs, and
it holds a lock on the folder (:data:`LOCK_NAME`) for as long as it runs, so a second run there is refused
instead of interleaving its files with the first's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lorakit.config import CONFIG_NAME
from lorakit.errors import AdapterFileError
from lorakit.io import check_output_apart, exclusive_lock
from lorakit.persistence import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from lorakit.training.checkpoint import CHECKPOINTS
from lorakit.training.config import TrainConfig
from lorakit.tuners.adalora.model import RANKS_PLOT

#: What ``lorakit train`` writes into ``--output`` (``--overwrite`` replaces these, and only these).
OUTPUT_NAMES = (
    CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, RANKS_PLOT, "metrics.json", "loss.png",
    "model",  # full fine-tuning's result
    CHECKPOINTS, f"{CHECKPOINTS}.previous",  # --overwrite sets the earlier run's checkpoints aside there
)  # fmt: skip
#: Held by the run writing into an output folder, so that a second run there is refused.
LOCK_NAME = ".lorakit-train.lock"


def prepare_output(cfg: TrainConfig, stack: contextlib.ExitStack | None = None) -> Path:
    """Create ``cfg.output``, check it is writable and lock it; refuse to replace lorakit's files unless asked.

    Args:
        stack: receives the output's lock (:data:`LOCK_NAME`), held until the stack closes; without one the
            lock is taken for the check only.

    Raises:
        AdapterFileError: the folder cannot be created or written; it is, or holds, one of the run's inputs
            (model folder, data files); another ``lorakit train`` is writing there; or it holds files this
            run would replace (:data:`OUTPUT_NAMES`) and neither ``overwrite`` nor ``resume`` was given.
    """
    out = Path(cfg.output).expanduser()
    if out.exists() and not out.is_dir():
        raise AdapterFileError(f"--output {out} is a file; give a folder")
    inputs = {"base model": cfg.model, "training data": cfg.data, "eval data": cfg.eval_data}
    check_output_apart(out, inputs, "--output")  # a hub id or bundled data set is no path: skipped
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lorakit-write-test", "w") as fh:
            fh.write("ok")
        (out / ".lorakit-write-test").unlink()
    except OSError as exc:
        raise AdapterFileError(f"--output {out} is not writable: {exc.strerror or exc}") from exc
    with contextlib.ExitStack() as local:
        (stack or local).enter_context(exclusive_lock(out / LOCK_NAME, f"lorakit train --output {out}"))
        ours = sorted(name for name in OUTPUT_NAMES if (out / name).exists())
        if ours and not (cfg.overwrite or cfg.resume):
            what = "an adapter" if CONFIG_NAME in ours else "files lorakit train writes"
            raise AdapterFileError(
                f"--output {out} already holds {what} ({', '.join(ours)}); pass --overwrite to replace them (only "
                "those; an adapter is replaced only when the new one is complete, other files are left alone), "
                "--resume to continue its run, or choose another folder"
            )
    return out
