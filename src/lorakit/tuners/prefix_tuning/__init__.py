"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): learned key/value pairs that every attention layer attends
to before the input's. Config here, encoder in :mod:`.encoder`, tuner (one registration line) in :mod:`.model`."""

from lorakit.tuners.prefix_tuning.config import PrefixTuningConfig

__all__ = ["PrefixTuningConfig"]
