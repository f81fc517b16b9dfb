"""``lorakit train --init``: how the LoRA adapter starts, and what a start that rewrites the base asks of a run.

``default`` (A Kaiming-uniform, B = 0) and ``gaussian`` start at ΔW = 0 on the base as loaded. ``pissa``,
``pissa_niter_<k>`` (PiSSA, arXiv 2404.02948) and ``olora`` (OLoRA, arXiv 2406.01775) start A and B at the base
weight's principal part and train on the residual ``W − s·B₀A₀`` (:mod:`lorakit.tuners.lora.starts`);
``orthogonal`` starts both non-zero with ``B₀A₀ = 0``. Two starts read the training data first (its first
:data:`SAMPLES` examples, in file order, so a resumed run recreates the same start): ``eva`` (EVA, arXiv
2410.07170) sets A to the top right-singular vectors of each layer's inputs and redistributes the ranks, B = 0;
``corda`` (CorDA's instruction-previewed mode, arXiv 2406.05223) factors ``W·C`` with C the covariance of each
layer's inputs and, like PiSSA, trains on the residual.

A run with PiSSA, OLoRA or CorDA therefore keeps the adapter as created (in a temporary folder) and saves the trained
adapter *converted*: the plain LoRA adapter of rank 2r that gives the trained model on the original base
(PEFT's ``path_initial_model_for_weight_conversion``), which loads anywhere a LoRA adapter does (PEFT, vLLM,
``merge_and_unload``) with no start to re-run. Checkpoints keep the unconverted adapter, which lorakit and PEFT
load by running the start again on the original base. Its "before" evaluation runs with the adapter as created,
which computes exactly the base model (with the adapter disabled the model would be the residual alone).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError, suggest
from lorakit.tasks import get_peft_model
from lorakit.training.data import collate
from lorakit.training.distributed import to_device
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.corda import preprocess_corda
from lorakit.tuners.lora.eva import initialize_lora_eva_weights
from lorakit.tuners.lora.subconfigs import CordaConfig, EvaConfig

if TYPE_CHECKING:
    from lorakit.training.config import TrainConfig

#: ``--init`` values (besides ``pissa_niter_<k>``), with what each does (``--init``'s help).
INITS: dict[str, str] = {
    "default": "A Kaiming-uniform, B = 0 (LoRA's start)",
    "gaussian": "A ~ N(0, 1/r), B = 0",
    "pissa": "A, B from the top-r SVD of W, trained on the residual (PiSSA, arXiv 2404.02948)",
    "olora": "A, B from the QR decomposition of W, trained on the residual (OLoRA, arXiv 2406.01775)",
    "orthogonal": "A, B non-zero on orthogonal halves of a random basis, B A = 0 (even --r)",
    "eva": "A from the top singular vectors of each layer's inputs on the training data, ranks redistributed, B = 0 "
    "(EVA, arXiv 2410.07170)",
    "corda": "A, B from the SVD of W times the covariance of each layer's inputs on the training data, trained on "
    "the residual (CorDA, arXiv 2406.05223)",
}
_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
#: The starts that rewrite the base weight into a residual (their final adapter is saved converted).
REWRITING = ("pissa", "olora", "corda")
#: Training examples EVA and CorDA read (CorDA's paper: 256 samples).
SAMPLES = 256


def rewrites_base(init: str) -> bool:
    return init in REWRITING or bool(_NITER.fullmatch(init))


def lora_init(init: str) -> bool | str:
    """The ``LoraConfig(init_lora_weights=...)`` value of an ``--init`` value."""
    return True if init == "default" else init


def start_fields(init: str) -> dict[str, Any]:
    """The sub-config a data-driven start needs in ``LoraConfig`` (PEFT's defaults; CorDA in IPM mode)."""
    if init == "eva":
        return {"eva_config": EvaConfig()}
    if init == "corda":
        return {"corda_config": CordaConfig(corda_method="ipm")}
    return {}


def create_adapter(
    model: nn.Module, lora: LoraConfig, init: str, examples: Sequence[dict], pad_id: int, batch_size: int
) -> nn.Module:
    """``get_peft_model(model, lora)``, with the data step of EVA (after it) or CorDA (before it) on the first
    :data:`SAMPLES` ``examples`` (tokenized rows), run in eval mode on the model's device."""
    device = next(model.parameters()).device
    rows = list(examples[:SAMPLES])
    if init == "corda":  # one unpadded sample per call: padding would count as data in the covariances
        samples = [to_device(collate([row], pad_id), device) for row in rows]

        def run_model() -> None:
            for batch in samples:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        with _evaluating(model):
            preprocess_corda(model, lora, run_model=run_model)
    peft_model = get_peft_model(model, lora)
    if init == "eva":  # every process reads the same rows, so no gathering across processes
        batches = [
            to_device(collate(rows[i : i + batch_size], pad_id), device) for i in range(0, len(rows), batch_size)
        ]
        with _evaluating(peft_model):
            initialize_lora_eva_weights(peft_model, batches, gather_distributed_inputs=False, show_progress_bar=False)
    return peft_model


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients, the model's mode restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def check_init(cfg: TrainConfig) -> None:
    """Refuse an ``--init`` value, or a combination with it, that the run cannot honour.

    Raises:
        ConfigError: naming the value and what is accepted.
    """
    init = cfg.init_lora_weights
    if not isinstance(init, str) or not (init in INITS or _NITER.fullmatch(init)):
        raise ConfigError(
            f"init {init!r} is not one of {(*INITS, 'pissa_niter_<k>')}" + suggest(str(init), list(INITS))
        )
    if init == "default":
        return
    if cfg.method != "lora":
        raise ConfigError(f"--init {init} starts LoRA adapters; method {cfg.method!r} has its own start")
    if getattr(cfg, "lora_bias", False):
        raise ConfigError(f"--lora-bias needs the default start (as in PEFT): --init {init} sets B from the weight")
    if cfg.loftq:
        raise ConfigError(f"--loftq is a start of its own (fitted to the quantized base); drop --init {init} or it")
    if init == "orthogonal" and cfg.r % 2:
        raise ConfigError(f"--init orthogonal needs an even --r (A and B each take half of a basis), got {cfg.r}")
    if rewrites_base(init) and cfg.bits is not None:
        raise ConfigError(
            f"--init {init} trains on the residual W − s·B₀A₀ and saves the adapter converted for the original "
            "base; on a quantized base that residual is quantized anew (PiSSA is refused there, as in PEFT), so the "
            "converted adapter would not give the trained model: train on the full-precision base, or use --loftq"
        )


class InitialAdapter:
    """The adapter as a base-rewriting start created it, saved into a temporary folder for the conversion at
    the end of the run (removed when the run ends)."""

    def __init__(self, model: Any, held: contextlib.ExitStack, is_main: bool) -> None:
        self.folder: Path | None = None
        if is_main:
            self.folder = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="lorakit-initial-adapter-")))
            model.save_pretrained(self.folder)

    def save(self, model: Any, output: Path) -> None:
        """Write the trained adapter into ``output`` as plain LoRA of rank 2r on the original base."""
        model.save_pretrained(output, path_initial_model_for_weight_conversion=self.folder)
