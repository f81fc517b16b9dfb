"""AdaLoRA's configuration: :class:`AdaLoraConfig` (Zhang et al. 2023, arXiv 2303.10512), PEFT's fields."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

from lorakit.config import PeftType, check_pattern_dict, is_int
from lorakit.errors import ConfigError, ShapeMismatchError
from lorakit.tuners.lora.config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ΔW = P Λ Q in SVD form with an adaptive rank.

    Each adapted layer holds ``init_r`` triplets: ``lora_A`` (Q, ``(init_r, in)``), ``lora_E`` (Λ,
    ``(init_r, 1)``) and ``lora_B`` (P, ``(out, init_r)``); ΔW = α/(init_r + 1e-5) · B (A ⊙ E). Training scores
    every triplet by the smoothed sensitivity |w · ∂L/∂w| times its uncertainty, and a cubic schedule lowers the
    total rank kept from ``init_r`` per layer to ``target_r`` per layer on average between step ``tinit`` and
    ``total_step − tfinal``, zeroing the least important triplets (λ = 0) every ``deltaT`` steps. The loss gains
    ``orth_reg_weight`` · mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F) to keep P and Q near-orthogonal. ``r`` is not used.

    PEFT's field names, defaults and file format; the fields below are AdaLoRA's, the others are LoRA's.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA
    NAME: ClassVar[str] = "AdaLoRA"

    def summary(self) -> str:
        kept = self.kept_ranks or {}
        ranks = f"{sum(kept.values())} of {self.init_r * len(kept)} triplets kept" if kept else "not cut yet"
        return (
            f"AdaLoRA init_r={self.init_r} -> target_r={self.target_r} on average: {ranks}  "
            f"lora_alpha={self.lora_alpha:g}  scaling={self.lora_alpha / (self.init_r + 1e-5):.4g}"
        )

    target_r: int = 8
    """Average rank per adapted matrix when the schedule ends (the total budget is target_r × matrices)."""
    init_r: int = 12
    """Rank every adapted matrix starts with."""
    tinit: int = 0
    """Steps of warm-up at the full budget before ranks are cut."""
    tfinal: int = 0
    """Steps at the end that train the final ranks with no further cuts."""
    deltaT: int = 1
    """Cut ranks every deltaT steps during the budget phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |w · ∂L/∂w| (0 < beta1 < 1)."""
    beta2: float = 0.85
    """EMA factor of the uncertainty |sensitivity − its EMA| (0 < beta2 < 1)."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty added to the loss in training (0 turns it off)."""
    total_step: int | None = None
    """Optimizer steps of the whole run; required (the schedule is laid out over it)."""
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]
    """Filled in by training: per adapted module (``<module>.lora_E``), which of its ``init_r`` triplets are
    kept. Saved adapters hold only the kept triplets; loading rebuilds each layer at its kept rank."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_r", "init_r", "deltaT", "total_step"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                hint = "; AdaLoRA lays its schedule out over the run's optimizer steps" if name == "total_step" else ""
                raise ConfigError(f"{name}={value!r} is invalid; accepted: a positive integer{hint}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} is invalid; accepted: an integer >= 0")
        if self.tinit + self.tfinal >= self.total_step:
            raise ConfigError(
                f"tinit + tfinal = {self.tinit} + {self.tfinal} >= total_step = {self.total_step}: no step is left to "
                "cut ranks in; lower tinit/tfinal or raise total_step"
            )
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} > init_r={self.init_r}; AdaLoRA only lowers ranks")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value!r} is invalid; accepted: a number strictly between 0 and 1")
        if (
            isinstance(self.orth_reg_weight, bool)
            or not isinstance(self.orth_reg_weight, (int, float))
            or not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0)
        ):
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight!r} is invalid; accepted: a number >= 0")
        if self.use_dora:
            raise ConfigError("AdaLoRA does not combine with DoRA (use_dora=True); use LoraConfig for DoRA")
        if self.init_lora_weights == "loftq":
            raise ConfigError("AdaLoRA does not combine with LoftQ; use LoraConfig for init_lora_weights='loftq'")
        if self.lora_bias:
            raise ConfigError(
                "AdaLoRA does not combine with lora_bias=True (PEFT's AdaLoRA layers give B no bias and ignore the "
                "flag); use LoraConfig for a bias on B"
            )
        if self.r != 8:
            warnings.warn(f"AdaLoRA ignores r={self.r}; every layer starts at init_r={self.init_r}", stacklevel=3)

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        check_pattern_dict("rank_pattern", self.rank_pattern, "None or {module: [bool]}", regex=False)
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
                raise ConfigError(f"rank_pattern[{key!r}] is invalid; AdaLoRA's entries are lists of booleans")

    @property
    def kept_ranks(self) -> dict[str, int] | None:
        """Rank kept per module (``rank_pattern`` counted), or None before the schedule has cut anything."""
        if self.rank_pattern is None:
            return None
        return {key.removesuffix(".lora_E"): sum(mask) for key, mask in self.rank_pattern.items()}

    def rank_for(self, module: str) -> tuple[int, str]:
        """Every layer is built at ``init_r`` and cut to the kept triplets of ``rank_pattern``.

        Raises:
            ShapeMismatchError: ``rank_pattern``'s mask for ``module`` does not have ``init_r`` entries.
        """
        mask = (self.rank_pattern or {}).get(f"{module}.lora_E")
        if mask is None:
            return self.init_r, "init_r"
        if len(mask) != self.init_r:
            raise ShapeMismatchError(
                f"rank_pattern[{module + '.lora_E'!r}] has {len(mask)} entries but init_r={self.init_r}; "
                "the config does not belong to this adapter's file"
            )
        return sum(mask), "the kept ranks of rank_pattern"
