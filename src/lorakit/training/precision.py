"""Mixed precision for ``lorakit train --dtype``: a 16-bit frozen base, fp32 adapters, autocast, loss scaling.

With ``--dtype bf16`` or ``fp16``:

* the frozen base model is loaded in that dtype (half the bytes of fp32 per weight);
* every trainable parameter stays fp32 — lorakit's ``get_peft_model`` creates adapters in fp32 on a 16-bit
  base, as PEFT's ``autocast_adapter_dtype`` does, and :func:`upcast_trainable` catches whatever a method
  would keep in the base's dtype (``modules_to_save`` copies). The optimizer updates fp32 weights: a 16-bit
  weight would lose updates smaller than its spacing (mixed-precision training, Micikevicius et al. 2018,
  arXiv 1710.03740, §3.1, fp32 master weights);
* the forward runs under ``torch.autocast(device_type, dtype)``: matrix products in the 16-bit dtype,
  reductions that need the range (softmax, norms, the loss on ``logits.float()``) in fp32;
* fp16's 5-bit exponent flushes small gradients to zero, so on CUDA the loss is multiplied by a scale that
  ``torch.amp.GradScaler`` adapts (ibid. §3.2, loss scaling); a step whose gradients overflow is skipped.
  bf16 has fp32's exponent range and needs no scaling.

``full`` fine-tuning trains every weight, so its weights stay fp32 and only the forward is autocast.

**fp16 on CPU is refused.** torch's CPU autocast accepts float16, but a CPU without AVX512-FP16 has no fp16
matrix kernel: an fp16 product of SmolLM2's MLP shape (512 × 576 × 1536) took 5.0× as long as fp32 and 11.6× as
long as bf16 on this project's 2-core AMD EPYC (AVX512-BF16, no AVX512-FP16), where a bf16 LoRA training step on
SmolLM2-135M takes 0.69× as long as fp32's (``benchmarks/bench_dtype.py``, ``benchmarks/results/bench_dtype.json``).
bf16 is the CPU's 16-bit dtype, and needs no loss scaling.

lorakit's fused LoRA/DoRA kernels (:mod:`lorakit.tuners.lora.fused`) need every operand in one dtype and no
autocast; under ``--dtype bf16/fp16`` they step aside and the plain path runs (autocast casts its products).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.errors import ConfigError

#: ``--dtype`` names and the torch dtypes they stand for.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: What ``torch.amp.GradScaler.state_dict()`` holds, and the kind of each value.
SCALER_KEYS: dict[str, type] = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` (a :data:`DTYPES` key) on ``device_type`` (``"cpu"``, ``"cuda"``)."""

    name: str = "fp32"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        """Whether the forward runs under autocast (bf16, fp16)."""
        return self.name != "fp32"

    def base_dtype(self, trains_base: bool) -> torch.dtype:
        """The dtype the base model is loaded in: the run's for a frozen base, fp32 when the base trains."""
        return torch.float32 if trains_base else self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward (and the loss) runs in: ``torch.autocast`` for bf16/fp16, else nothing."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scaling(self) -> bool:
        """Whether gradients need loss scaling: fp16 (on CUDA, the one device fp16 is accepted on)."""
        return self.name == "fp16"

    def grad_scaler(self) -> Any:
        """A fresh ``torch.amp.GradScaler`` where :attr:`loss_scaling`, else None."""
        return torch.amp.GradScaler(self.device_type) if self.loss_scaling else None

    def describe(self, trains_base: bool = False) -> str:
        """One line for the run's log."""
        if not self.mixed:
            return "precision: fp32"
        weights = "fp32 weights" if trains_base else f"{self.name} base weights, fp32 adapters"
        scaled = ", loss scaling (GradScaler)" if self.loss_scaling else ""
        return f"precision: {weights}, forward under torch.autocast({self.device_type!r}, {self.dtype}){scaled}"


def resolve(name: str, device: torch.device) -> Precision:
    """The :class:`Precision` of ``--dtype name`` on ``device``.

    Raises:
        ConfigError: an unknown name; fp16 on a CPU; bf16 on a GPU without bf16 support; a 16-bit dtype on a
            device other than CPU and CUDA.
    """
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {tuple(DTYPES)}")
    if name == "fp32":
        return Precision(name, device.type)
    if device.type == "cpu" and name == "fp16":
        raise ConfigError(
            "--dtype fp16 is refused on the CPU: without AVX512-FP16 a CPU has no fp16 matrix kernel (an fp16 "
            "product runs slower than fp32), and loss scaling is a CUDA feature here. Use --dtype bf16 on the "
            "CPU, or fp16 with --device cuda"
        )
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--dtype bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use --dtype fp16 "
            "(with loss scaling) or fp32"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--dtype {name} is supported on cpu and cuda devices; this run is on {device.type}")
    return Precision(name, device.type)


def upcast_trainable(model: torch.nn.Module) -> list[str]:
    """Cast every trainable floating-point parameter that is not fp32 to fp32, in place; returns their names.

    Adapters are made fp32 on a 16-bit base already; this catches copies a method makes of base modules
    (``modules_to_save``), which would otherwise train in 16 bits.
    """
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
            names.append(name)
    return names


def scaler_state(scaler: Any) -> dict[str, Any]:
    """``scaler``'s state as JSON data (for ``trainer_state.json``)."""
    state = scaler.state_dict()
    return {k: SCALER_KEYS[k](state[k]) for k in SCALER_KEYS if k in state}


def check_scaler_state(value: Any) -> dict[str, Any]:
    """A GradScaler state read from a checkpoint, checked: the keys of :data:`SCALER_KEYS`, finite numbers.

    Raises:
        ValueError: what is wrong with it.
    """
    if not isinstance(value, dict) or set(value) != set(SCALER_KEYS):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"'grad_scaler' holds {keys}, expected the keys {sorted(SCALER_KEYS)}")
    for key, kind in SCALER_KEYS.items():
        v = value[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok or (kind is int and v != int(v)):
            raise ValueError(f"'grad_scaler.{key}' is {v!r}, expected a non-negative {kind.__name__}")
    return {k: SCALER_KEYS[k](v) for k, v in value.items()}
