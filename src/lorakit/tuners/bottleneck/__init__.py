"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2020, arXiv 2005.00247): a small
MLP with a skip connection after a transformer sub-block, as the adapters library (AdapterHub) computes it."""

from lorakit.tuners.bottleneck.config import DEFAULT_PLACEMENTS, NON_LINEARITIES, BottleneckConfig

__all__ = ["DEFAULT_PLACEMENTS", "NON_LINEARITIES", "BottleneckConfig"]
