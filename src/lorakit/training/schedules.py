"""Learning-rate schedules (``--scheduler``): transformers' four, computed as transformers computes them.

``lorakit train`` used ``transformers.get_scheduler``, whose module imports ``transformers.trainer_utils``, which
imports PEFT when it is installed, which imports bitsandbytes: a plain fp32 run printed bitsandbytes' CPU-kernel
warnings (and spent a second importing both). These are the same ``LambdaLR`` schedules, the same float
arithmetic step by step and the same state dict (a checkpoint written with either resumes with the other):
``tests/test_quiet_imports.py`` compares them with transformers' at every step.

With ``w`` warmup steps and ``T`` steps in all, the factor on the base learning rate at step ``t`` is ``t / w``
during warmup, then: ``linear`` ``(T - t) / (T - w)``; ``cosine`` ``½ (1 + cos(π p))`` with ``p = (t - w) / (T - w)``
(Loshchilov & Hutter 2017, arXiv 1608.03983, eq. 5, one half-period, no restarts); ``constant_with_warmup`` 1;
``constant`` 1 from the start (no warmup, as in transformers).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _constant(_: int | None = None) -> float:
    return 1


def _constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def get_scheduler(name: str, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """The ``LambdaLR`` for ``name`` (``linear``, ``cosine``, ``constant``, ``constant_with_warmup``).

    Raises:
        ValueError: another name.
    """
    if name == "constant":
        return LambdaLR(optimizer, _constant)  # a plain function: its state dict entry is None, as transformers'
    steps = dict(num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    schedules = {
        "constant_with_warmup": partial(_constant_with_warmup, num_warmup_steps=num_warmup_steps),
        "linear": partial(_linear, **steps),
        "cosine": partial(_cosine, **steps, num_cycles=0.5),
    }
    if name not in schedules:
        raise ValueError(f"scheduler {name!r} is not one of {['constant', *schedules]}")
    return LambdaLR(optimizer, schedules[name])
