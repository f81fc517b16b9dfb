"""LoRA (Hu et al. 2021, arXiv 2106.09685): ΔW = s·BA beside a frozen W; DoRA, rsLoRA and LoftQ are options."""

from lorakit.tuners.lora.config import DEFAULT_TARGET_MODULES, LoraConfig

__all__ = ["DEFAULT_TARGET_MODULES", "LoraConfig"]
