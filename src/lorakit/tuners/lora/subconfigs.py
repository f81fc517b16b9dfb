"""The sub-configurations of LoRA's data-driven starts: :class:`EvaConfig` and :class:`CordaConfig` (PEFT's fields,
defaults and file form: ``adapter_config.json`` holds them as plain dicts under ``eva_config`` / ``corda_config``).

They live apart from the algorithms (:mod:`lorakit.tuners.lora.eva`, :mod:`lorakit.tuners.lora.corda`) so that
:class:`~lorakit.LoraConfig` can validate them without importing the model-level code.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lorakit.config import check_bool, is_int, is_number
from lorakit.errors import ConfigError

T = TypeVar("T")


@dataclass
class EvaConfig:
    """EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv 2410.07170): A starts at the top right-singular
    vectors of each adapted layer's inputs, ranks redistributed across layers by explained variance (§3).

    Used with ``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))`` and
    :func:`lorakit.initialize_lora_eva_weights`.
    """

    rho: float = 2.0
    """Rank redistribution budget (≥ 1): a layer may get up to ``round(r · rho)`` components; the total stays the
    sum of the configured ranks. 1.0 keeps every layer at its own rank (no redistribution)."""
    tau: float = 0.99
    """Early stopping (in [0, 1]): a layer stops collecting batches once the cosine similarity between its
    components before and after a batch is ≥ tau for every component its rank needs."""
    use_label_mask: bool = True
    """Leave out positions whose ``labels`` equal ``label_mask_value`` (prompt tokens in SFT) from the SVD."""
    label_mask_value: int = -100
    """The label value that marks ignored positions."""
    whiten: bool = False
    """Divide each component by the square root of its singular value (found helpful for vision models)."""
    adjust_scaling_factors: bool = True
    """Scale alpha with the new rank (``alpha · r_new / r``) so that the scaling s = α/r of a layer whose rank EVA
    changed stays what the config asked for."""

    def __post_init__(self) -> None:
        if not is_number(self.rho) or self.rho < 1.0:
            raise ConfigError(
                f"eva_config.rho={self.rho!r} is invalid; accepted: a number ≥ 1.0 (1.0: no redistribution)"
            )
        if not is_number(self.tau) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"eva_config.tau={self.tau!r} is invalid; accepted: a number in [0, 1] such as 0.99")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            check_bool(f"eva_config.{name}", getattr(self, name))
        if not is_int(self.label_mask_value):
            raise ConfigError(f"eva_config.label_mask_value={self.label_mask_value!r} is invalid; accepted: an int")


@dataclass
class CordaConfig:
    """CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv 2406.05223): the SVD of ``W C``, with
    C the covariance of the layer's inputs on sample data, splits W into a frozen residual and the adapter.

    Used with ``LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...))`` after
    :func:`lorakit.preprocess_corda`.
    """

    cache_file: str | None = None
    """File of the decomposition (U, S, V of each layer, cropped to its rank): written by ``preprocess_corda`` and
    read instead of recomputing when it exists. ``.safetensors`` files are written as safetensors, any other name in
    PEFT's ``torch.save`` form; both are read without running code."""
    covariance_file: str | None = None
    """File of the per-layer input covariances (``(in, in)`` each), reusable for other ranks on the same data;
    written and read like ``cache_file``."""
    corda_method: Literal["ipm", "kpm"] = "ipm"
    """``"ipm"`` (instruction-previewed mode): the adapter takes the r largest components, for data of the task to
    learn. ``"kpm"`` (knowledge-preserved mode): it takes the r smallest, for data whose knowledge should be kept
    (the largest ones stay frozen in the residual)."""
    verbose: bool = False
    """Show a progress bar while decomposing the layers."""
    use_float16_for_covariance: bool = False
    """Accumulate covariances in the inputs' half precision instead of float32 (half the memory, less exact)."""
    prune_temporary_fields: bool = True
    """Drop the per-layer covariances from the model once the decomposition is built."""

    def __post_init__(self) -> None:
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigError(f"corda_config.{name}={value!r} is invalid; accepted: a file path or None")
        if self.corda_method not in ("ipm", "kpm", None):
            raise ConfigError(
                f"corda_config.corda_method={self.corda_method!r} is invalid; accepted: 'ipm' (adapter from the "
                "largest components) or 'kpm' (from the smallest)"
            )
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            check_bool(f"corda_config.{name}", getattr(self, name))


def as_subconfig(name: str, value: Any, cls: type[T]) -> T | None:
    """``value`` as a ``cls`` instance: None stays None, a dict (from ``adapter_config.json``) becomes one.

    A dict's keys that ``cls`` does not know (written by a newer PEFT) are dropped with a warning.

    Raises:
        ConfigError: ``value`` is neither None, a ``cls`` nor a dict, or one of its values is invalid.
    """
    if value is None or isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value) and type(value).__name__ == cls.__name__:  # PEFT's own EvaConfig/CordaConfig
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} is invalid; accepted: a {cls.__name__}, a dict of its fields, or None")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - known)
    if unknown:
        warnings.warn(f"{name} holds fields unknown to lorakit, ignored: {unknown}", stacklevel=4)
    return cls(**{k: v for k, v in value.items() if k in known})
