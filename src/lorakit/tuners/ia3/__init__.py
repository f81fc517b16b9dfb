"""IA³ (Liu et al. 2022, arXiv 2205.05638): learned vectors that rescale a layer's output, or its input."""

from lorakit.tuners.ia3.config import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES, IA3Config

__all__ = ["DEFAULT_FEEDFORWARD_MODULES", "DEFAULT_TARGET_MODULES", "IA3Config"]
