"""Bottleneck adapters' configuration: :class:`BottleneckConfig` and where each architecture's adapters sit.

A bottleneck adapter (Houlsby et al. 2019, arXiv 1902.00751, §2.1 and Fig. 2) is a small MLP with a skip
connection, inserted after a transformer sub-block's output and before the model's own residual add::

    a = h + s · W_up σ(W_down x + b_down) + b_up          x: the sub-block output h, or h + r (below)

with ``W_down: (m, d)``, ``W_up: (d, m)``, ``m = d / reduction_factor``. Houlsby puts one after the attention
block and one after the feed-forward block of every layer; Pfeiffer et al. 2020 (arXiv 2005.00247, §2.2,
"AdapterFusion") keep the one after the feed-forward block only and feed it the sum of the sub-block output
and the residual stream. The field names and defaults are those of the adapters library (AdapterHub,
``adapters.BnConfig``), whose two standard configs are :meth:`BottleneckConfig.pfeiffer` (``SeqBnConfig``) and
:meth:`BottleneckConfig.houlsby` (``DoubleSeqBnConfig``). PEFT has no bottleneck adapters: ``peft_type`` is
lorakit's own ``"BOTTLENECK"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from lorakit.config import PeftConfig, PeftType, check_bool, is_int, is_number
from lorakit.errors import ConfigError

#: The non-linearity σ between the projections, by name (the names of the adapters library, which takes them
#: from transformers' ``ACT2FN``; ``leakyrelu`` is its own spelling of ``leaky_relu``).
NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leakyrelu": F.leaky_relu,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}
#: How the projections start: the adapters library's three schemes (see ``init_weights``).
INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")
SCALINGS = ("learned", "channel")

# Where the adapters sit, by ``config.model_type``. ``blocks`` names the list of transformer blocks (the end of
# its module name); per sub-block, relative to a block: ``output`` is the module whose output is the
# sub-block's output right before the model's residual add (after any dropout, as in the adapters library),
# ``residual`` the module whose first input is the residual stream r entering the sub-block (needed by
# ``original_ln_before`` and ``is_parallel``), ``norm`` (post-LN models only) the model's own norm applied after
# the residual add. The adapters library places its adapters at the same points (its model mixins).
_PRE_LN_DECODER = {
    "blocks": "layers",
    "attention": {"output": "self_attn.o_proj", "residual": "input_layernorm"},
    "feedforward": {"output": "mlp.down_proj", "residual": "post_attention_layernorm"},
}
_BERT = {
    "blocks": "encoder.layer",
    "attention": {
        "output": "attention.output.dropout",
        "residual": "attention.self",
        "norm": "attention.output.LayerNorm",
    },
    "feedforward": {"output": "output.dropout", "residual": "intermediate", "norm": "output.LayerNorm"},
}
DEFAULT_PLACEMENTS: dict[str, dict[str, Any]] = {
    "llama": _PRE_LN_DECODER,
    "mistral": _PRE_LN_DECODER,
    "qwen2": _PRE_LN_DECODER,
    "qwen3": _PRE_LN_DECODER,
    "gpt2": {
        "blocks": "h",
        "attention": {"output": "attn.resid_dropout", "residual": "ln_1"},
        "feedforward": {"output": "mlp.dropout", "residual": "ln_2"},
    },
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
}
SUBLAYERS = ("attention", "feedforward")
_PLACEMENT_EXAMPLE = (
    "{'blocks': 'layers', 'attention': {'output': 'self_attn.o_proj', 'residual': 'input_layernorm'}, "
    "'feedforward': {'output': 'mlp.down_proj', 'residual': 'post_attention_layernorm'}}"
)


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of one bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020): the adapters library's
    ``BnConfig`` fields that change what is computed. The defaults are Pfeiffer's (``SeqBnConfig``), the adapters
    library's default ``"seq_bn"``.

    One adapter, given the sub-block output h ``(..., d)`` and the residual stream r entering the sub-block
    (adapters library, ``Adapter.pre_forward``/``forward``)::

        x = h + r, then the model's post-LN norm if it has one     if original_ln_before, else x = h
        res = h if residual_before_ln is True; x if False; h + r before that norm if "post_add"
        out = s · (W_up σ(W_down LN_before(x) + b_down) + b_up)   (LN_before with ln_before; dropout in training)
        out = LN_after(out + res)                                 with adapter_residual_before_ln and ln_after
        out = LN_after(out) + res                                 otherwise (LN_after only with ln_after)

    and the model then adds r (and applies its post-LN norm) as it always does. With ``is_parallel`` the adapter
    reads r instead: ``out = h + s · (W_up σ(W_down r + b_down) + b_up)`` (He et al. 2021, arXiv 2110.04366).
    Several active adapters run one after the other, each on the previous one's output (the adapters library's
    ``Stack`` of sequential adapters; a parallel one adds its term to that output).
    """

    mh_adapter: bool = False
    """Add an adapter after each block's attention sub-block (Houlsby: yes; Pfeiffer: no)."""
    output_adapter: bool = True
    """Add an adapter after each block's feed-forward sub-block (both Houlsby and Pfeiffer)."""
    reduction_factor: float | dict[str, float] = 16
    """The bottleneck size is ``hidden_size / reduction_factor`` and must come out a whole number (≥ 1). A dict
    gives factors per block index (as strings) with a ``"default"``: ``{"0": 8, "default": 16}``."""
    non_linearity: str = "relu"
    """σ between the projections; one of ``NON_LINEARITIES`` (Pfeiffer: relu, Houlsby: swish)."""
    original_ln_before: bool = True
    """Feed the adapter h + r (and the model's post-LN norm of it, for BERT-like models) instead of h alone
    (Pfeiffer: yes; Houlsby: no). Needs the placement's ``residual`` module."""
    original_ln_after: bool = True
    """The model adds r (and applies its post-LN norm) after the adapter. lorakit sits inside the model's own
    blocks, where this always happens, so only ``true`` is accepted (as in the adapters library's hooked mode)."""
    residual_before_ln: bool | str = True
    """The adapter's skip connection: h (``true``), its input x (``false``), or h + r before the model's post-LN
    norm (``"post_add"``; post-LN models with ``original_ln_before`` only)."""
    adapter_residual_before_ln: bool = False
    """Add the skip connection before the adapter's own ``ln_after`` norm instead of after it."""
    ln_before: bool = False
    """A new LayerNorm on the adapter's input, before the down-projection."""
    ln_after: bool = False
    """A new LayerNorm on the adapter's output."""
    init_weights: str = "bert"
    """How new projections start: ``"bert"`` (normal, std 0.02, zero biases: near the identity), ``"mam_adapter"``
    (down as nn.Linear, up zero: exactly the identity) or ``"houlsby"`` (truncated normal, std 0.01: Houlsby et
    al. §3.6's near-identity start)."""
    is_parallel: bool = False
    """The adapter reads r, beside the sub-block, instead of its output (He et al. 2021's parallel adapter)."""
    scaling: float | str = 1.0
    """s: a number, ``"learned"`` (one trained scalar, starts at 1) or ``"channel"`` (one trained value per
    hidden feature, start at 1)."""
    use_gating: bool = False
    """Scale the adapter's output by a learned gate, sigmoid(w·x + b) averaged over the sequence (UniPELT)."""
    dropout: float = 0.0
    """Dropout on the adapter's output, in training."""
    leave_out: list[int] = field(default_factory=list)
    """Block indices (from 0) that get no adapter."""
    placement: dict[str, Any] | None = None
    """Where the adapters sit; None picks the architecture's entry in ``DEFAULT_PLACEMENTS``. For another
    architecture give a dict of the same shape: ``{"blocks": "layers", "attention": {"output": "self_attn.o_proj",
    "residual": "input_layernorm"}, "feedforward": {"output": "mlp.down_proj", "residual":
    "post_attention_layernorm"}}``. ``blocks`` ends the name of the list of blocks; the rest are relative to a
    block: ``output`` is the module the adapter follows, ``residual`` the module whose first input is the residual
    stream (only needed with ``original_ln_before`` or ``is_parallel``), ``norm`` a post-LN model's norm after the
    residual add."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.BOTTLENECK
    NAME: ClassVar[str] = "bottleneck"
    #: How this method's per-module tensors begin in its file (read by ``lorakit inspect``).
    FILE_PREFIX: ClassVar[str] = "bottleneck_"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "mh_adapter",
            "output_adapter",
            "original_ln_before",
            "original_ln_after",
            "adapter_residual_before_ln",
            "ln_before",
            "ln_after",
            "is_parallel",
            "use_gating",
        ):
            check_bool(name, getattr(self, name))
        if not (self.mh_adapter or self.output_adapter):
            raise ConfigError(
                "mh_adapter and output_adapter are both false, so this adapter would sit nowhere; set "
                "output_adapter=True (Pfeiffer), or both (Houlsby)"
            )
        self._check_reduction_factor()
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            raise ConfigError(
                f"non_linearity={self.non_linearity!r} is not known; accepted: {', '.join(sorted(NON_LINEARITIES))}"
            )
        self.non_linearity = self.non_linearity.lower()
        if self.original_ln_after is not True:
            raise ConfigError(
                "original_ln_after=False is not supported: lorakit's adapters sit inside the model's own blocks, "
                "which always add the residual (and apply their norm) after them; accepted: true"
            )
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ConfigError(
                f"residual_before_ln={self.residual_before_ln!r} is invalid; accepted: true, false or 'post_add'"
            )
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ConfigError(
                "residual_before_ln='post_add' takes the skip connection from h + r, which only exists with "
                "original_ln_before=True; set original_ln_before=True or residual_before_ln to true or false"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"init_weights={self.init_weights!r} is not known; accepted: {', '.join(INIT_WEIGHTS)}")
        if not (is_number(self.scaling) and math.isfinite(self.scaling)) and self.scaling not in SCALINGS:
            raise ConfigError(
                f"scaling={self.scaling!r} is invalid; accepted: a number such as 1.0, 'learned' or 'channel'"
            )
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} is invalid; accepted: a number in [0, 1)")
        if not isinstance(self.leave_out, (list, tuple)) or not all(is_int(i) and i >= 0 for i in self.leave_out):
            raise ConfigError(
                f"leave_out={self.leave_out!r} is invalid; accepted: a list of block indices such as [0, 11]"
            )
        self.leave_out = list(self.leave_out)
        if self.placement is not None:
            check_placement(self.placement)

    def _check_reduction_factor(self) -> None:
        factors = self.reduction_factor
        if isinstance(factors, dict):
            if "default" not in factors or not all(isinstance(k, str) for k in factors):
                raise ConfigError(
                    f"reduction_factor={factors!r} is invalid; a dict needs string keys (block indices) and a "
                    "'default', e.g. {'0': 8, 'default': 16}"
                )
            values = list(factors.values())
        else:
            values = [factors]
        for value in values:
            if not is_number(value) or not math.isfinite(value) or value < 1:
                raise ConfigError(
                    f"reduction_factor={value!r} is invalid; accepted: a number ≥ 1 that divides the hidden size, "
                    "such as 16 (bottleneck size = hidden_size / reduction_factor)"
                )

    def summary(self) -> str:
        """One line for ``lorakit inspect``: where the adapters sit and what sizes them."""
        where = " and ".join(
            n for n, on in (("attention", self.mh_adapter), ("feed-forward", self.output_adapter)) if on
        )
        kind = "parallel" if self.is_parallel else "sequential"
        return (
            f"bottleneck adapters ({kind}, after {where}): reduction_factor={self.reduction_factor}, "
            f"non_linearity={self.non_linearity}"
        )

    # -- what the tuner asks -------------------------------------------------------------------------------

    @property
    def needs_residual(self) -> bool:
        """Whether the adapter reads the residual stream r entering the sub-block."""
        return self.original_ln_before or self.is_parallel

    def factor_for(self, block: int) -> float:
        """The reduction factor of block ``block`` (the adapters library's rule for a dict)."""
        factors = self.reduction_factor
        if isinstance(factors, dict):
            return factors.get(str(block), factors["default"])
        return factors

    def placement_for(self, model_type: str | None) -> dict[str, Any]:
        """``placement`` made concrete: the architecture's entry in ``DEFAULT_PLACEMENTS`` for None.

        Raises:
            ConfigError: None was given and lorakit knows no placement for ``model_type``.
        """
        if self.placement is not None:
            return self.placement
        if model_type not in DEFAULT_PLACEMENTS:
            raise ConfigError(
                f"lorakit knows where bottleneck adapters sit for model_type in {sorted(DEFAULT_PLACEMENTS)}, not "
                f"{model_type!r}; give placement= naming this model's modules, e.g. {_PLACEMENT_EXAMPLE}"
            )
        return DEFAULT_PLACEMENTS[model_type]

    # -- presets --------------------------------------------------------------------------------------------

    @classmethod
    def pfeiffer(cls, **overrides: Any) -> BottleneckConfig:
        """Pfeiffer et al. 2020 (arXiv 2005.00247): one adapter after the feed-forward block, fed h + r; ReLU,
        reduction 16. The adapters library's ``SeqBnConfig`` (``"seq_bn"``)."""
        return cls(**{**_PFEIFFER, **overrides})

    @classmethod
    def houlsby(cls, **overrides: Any) -> BottleneckConfig:
        """Houlsby et al. 2019 (arXiv 1902.00751, §2.1): adapters after the attention and the feed-forward blocks,
        fed the sub-block output; swish, reduction 16. The adapters library's ``DoubleSeqBnConfig``."""
        return cls(**{**_HOULSBY, **overrides})

    @classmethod
    def parallel(cls, **overrides: Any) -> BottleneckConfig:
        """He et al. 2021 (arXiv 2110.04366): one adapter beside the feed-forward block, reading r; ReLU,
        reduction 2, scaling 4, up-projection starting at zero. The adapters library's ``ParBnConfig``."""
        return cls(**{**_PARALLEL, **overrides})


_COMMON = {"original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False}
_COMMON.update(ln_before=False, ln_after=False, reduction_factor=16, output_adapter=True)
_PFEIFFER = {**_COMMON, "original_ln_before": True, "mh_adapter": False, "non_linearity": "relu"}
_HOULSBY = {**_COMMON, "original_ln_before": False, "mh_adapter": True, "non_linearity": "swish"}
_PARALLEL = {**_COMMON, "original_ln_before": False, "mh_adapter": False, "non_linearity": "relu"}
_PARALLEL.update(reduction_factor=2, init_weights="mam_adapter", is_parallel=True, scaling=4.0)


def check_placement(placement: Any) -> None:
    """Refuse a ``placement`` that is not ``{'blocks': str, 'attention'/'feedforward': {'output': str, ...}}``.

    Raises:
        ConfigError: naming the first problem and the accepted shape.
    """
    problem = None
    if not isinstance(placement, dict) or not isinstance(placement.get("blocks"), str) or not placement["blocks"]:
        problem = "it needs 'blocks', the name of the model's list of blocks"
    elif not any(s in placement for s in SUBLAYERS) or set(placement) - {"blocks", *SUBLAYERS}:
        problem = f"its keys must be 'blocks' and one or both of {SUBLAYERS}"
    else:
        for sublayer in SUBLAYERS:
            site = placement.get(sublayer)
            if site is None:
                continue
            if not isinstance(site, dict) or not isinstance(site.get("output"), str) or not site["output"]:
                problem = f"{sublayer!r} needs 'output', the module whose output the adapter follows"
            elif set(site) - {"output", "residual", "norm"}:
                problem = f"{sublayer!r} may only hold 'output', 'residual' and 'norm'"
            elif not all(site.get(k) is None or (isinstance(site[k], str) and site[k]) for k in ("residual", "norm")):
                problem = f"{sublayer!r}: 'residual' and 'norm' are module names (or null)"
    if problem:
        raise ConfigError(f"placement={placement!r} is invalid: {problem}; e.g. {_PLACEMENT_EXAMPLE}")
