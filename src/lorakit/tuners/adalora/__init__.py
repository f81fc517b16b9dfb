"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): ΔW = P Λ Q in SVD form with an importance-driven rank budget."""

from lorakit.tuners.adalora.config import AdaLoraConfig

__all__ = ["AdaLoraConfig"]
