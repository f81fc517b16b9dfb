"""PEFT's ``peft.optimizers`` import path: ``from lorakit.optimizers import create_loraplus_optimizer``."""

from lorakit.tuners.lora.loraplus import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]
