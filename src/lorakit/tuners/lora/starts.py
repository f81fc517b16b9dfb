"""Starts that read the base weight: PiSSA, OLoRA, and PEFT's orthogonal start (``init_lora_weights=...``).

Each gives the adapter a non-zero start while the model's output stays what it was, as PEFT 0.21 does:

* ``"pissa"`` — PiSSA (Meng et al. 2024, arXiv 2404.02948, §3): the rank-r SVD ``W ≈ V_r S_r U_rᵀ`` of the
  ``(d, k)`` base weight gives ``B = V_r √(S_r/s)`` ``(d, r)`` and ``A = √(S_r/s) U_rᵀ`` ``(r, k)``, so s·BA is
  W's principal part, and the base weight becomes the residual ``W_res = W − s·BA``. Training then moves the
  principal directions; the paper reports faster convergence than LoRA's zero start.
* ``"pissa_niter_<k>"`` — the same with the randomized SVD of Halko et al. (``torch.svd_lowrank``, k subspace
  iterations; the paper's §3 "fast SVD", seconds instead of minutes on large weights). It draws from the global
  RNG, so two runs agree only with the same seed.
* ``"olora"`` — OLoRA (Büyükakyüz 2024, arXiv 2406.01775, §3): the QR decomposition ``W = QR`` gives
  ``B = Q[:, :r]`` (orthonormal columns) and ``A = R[:r]``, and the base weight becomes ``W − s·BA``.
* ``"orthogonal"`` — PEFT's orthogonal start: with Q the QR factor of an ``(r, r)`` Gaussian, A is built on
  Q's odd rows and B on its even rows (``A = (G_a Q_odd)ᵀ/10``, ``B = G_bᵀ Q_even/10``), so ``BA = 0`` exactly
  in exact arithmetic while both factors are non-zero; the base is untouched. r must be even.

All three apply to linear layers (``nn.Linear``, transformers' ``Conv1D`` through its ``(out, in)`` view);
embeddings get LoRA's usual start (PEFT's behaviour), convolutions are refused (PEFT fails there). OLoRA also
runs on bitsandbytes layers, as in PEFT: the weight is dequantized, factored, and the residual quantized again
with the layer's settings (so ``Q(W − s·BA) + s·BA ≈ W`` up to the new rounding). PiSSA is refused on a
quantized layer, as PEFT refuses it: run it on the full-precision model, and quantize the residual model.

Loading follows PEFT: an adapter file whose config holds one of the base-rewriting starts re-runs it on the
base it is loaded onto (rewriting W into the residual) before the file's A and B are copied in, so a PiSSA
adapter loads onto the original base model. To get an adapter for the original base with no start to re-run,
save with ``path_initial_model_for_weight_conversion`` (:mod:`lorakit.tuners.lora.start_conversion`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.layers.kinds import LayerKind
    from lorakit.tuners.lora.layer import LoraLayer

_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
#: Layer kinds these starts factor (their weight read as the ``(out, in)`` matrix M).
_LINEAR_KINDS = ("linear", "conv1d_hf")
_QUANTIZED_KINDS = ("linear4bit", "linear8bit")
#: Kinds where PEFT gives these starts LoRA's usual init instead (so does lorakit).
_DEFAULT_INIT_KINDS = ("embedding",)
#: The adapter forms (variants) that take these starts; AdaLoRA has its own (as in PEFT).
_VARIANTS = ("lora", "dora")


def start_name(init: Any) -> str | None:
    """``"pissa"``, ``"olora"`` or ``"orthogonal"`` for an ``init_lora_weights`` value this module runs, else None
    (``"pissa_niter_<k>"`` is ``"pissa"``)."""
    if not isinstance(init, str):
        return None
    if init in ("pissa", "olora", "orthogonal"):
        return init
    return "pissa" if _PISSA_NITER.fullmatch(init) else None


def rewrites_base(init: Any) -> bool:
    """Whether the start writes the residual ``W − s·BA`` into the base weight (PiSSA and OLoRA)."""
    return start_name(init) in ("pissa", "olora")


def pissa_niter(init: str) -> int | None:
    """k of ``"pissa_niter_<k>"``; None for the full SVD (``"pissa"``)."""
    match = _PISSA_NITER.fullmatch(init)
    return int(match.group(1)) if match else None


# -- the factors --------------------------------------------------------------------------------------------------


def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's ``(A (r, k), B (d, r))`` for ``weight`` ``(d, k)``, in float32, computed as PEFT computes them.

    With ``W = V S Uᵀ``: ``A = diag(√(S_r/s)) U_rᵀ`` and ``B = V_r diag(√(S_r/s))``, so ``s·BA`` is the best
    rank-r approximation of W (Eckart–Young). ``niter``: use ``torch.svd_lowrank`` with that many subspace
    iterations instead of the full SVD.
    """
    w = weight.to(torch.float32)
    if niter is None:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(w, r, niter=niter)
        uhr = ur.t()
    sr = sr / scaling
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's ``(A (r, k), B (d, r))`` for ``weight`` ``(d, k)`` in float32: ``W = QR``, ``B = Q[:, :r]``,
    ``A = R[:r]`` (``s·BA`` is then W's projection onto B's orthonormal columns, times s)."""
    q, rr = torch.linalg.qr(weight.to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's orthogonal ``(A (r, in), B (out, r))``, drawn on the CPU from the global RNG in PEFT's order.

    Q, the QR factor of an ``(r, r)`` Gaussian, has orthonormal rows; A's rows mix Q's odd rows
    (``A = Q_oddᵀ G_aᵀ / 10``) and B's columns its even rows (``B = G_bᵀ Q_even / 10``), so
    ``BA = G_bᵀ (Q_even Q_oddᵀ) G_aᵀ / 100 = 0`` while A and B each have rank r/2.
    """
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    a = torch.randn(in_features, r // 2).mm(q_odd).T / 10.0
    b = torch.randn(r // 2, out_features).T.mm(q_even) / 10.0
    return a.contiguous(), b.contiguous()


def residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W − s·BA`` in float32 (the product grouped as PEFT groups it, ``(s·B) A``)."""
    return weight.to(torch.float32) - scaling * b @ a


# -- checks before anything changes -------------------------------------------------------------------------------


def takes_start(kind: LayerKind, variant: str) -> bool:
    """Whether a layer of ``kind`` with an adapter of form ``variant`` runs these starts (else LoRA's own init)."""
    return variant in _VARIANTS and kind.name not in _DEFAULT_INIT_KINDS


def check_start(name: str, kind: LayerKind, shape: tuple[int, int], r: int, init: str) -> None:
    """Refuse a start that cannot run on module ``name`` (a ``(d, k)`` weight of ``kind``), before any change.

    Raises:
        ConfigError: a kind the start does not factor (convolutions; PiSSA on a quantized layer), a rank above
            ``min(d, k)`` for PiSSA/OLoRA, or an odd rank for the orthogonal start.
    """
    start = start_name(init)
    if kind.name in _QUANTIZED_KINDS and start == "pissa":
        raise ConfigError(
            f"init_lora_weights={init!r} needs a float base weight, but {name!r} is quantized ({kind.name}); as in "
            "PEFT, run PiSSA on the full-precision model, then quantize the residual model (lorakit.quantize)"
        )
    if kind.name not in (*_LINEAR_KINDS, *_QUANTIZED_KINDS):
        layers = "nn.Linear, transformers Conv1D" + (", bitsandbytes linears" if start == "olora" else "")
        raise ConfigError(
            f"init_lora_weights={init!r} initialises linear layers ({layers}), not {name!r} ({kind.name}); narrow "
            "target_modules, or use init_lora_weights=True"
        )
    d, k = shape
    if start in ("pissa", "olora") and r > min(d, k):
        raise ConfigError(
            f"init_lora_weights={init!r} takes the top r={r} directions of {name!r}'s {d}x{k} weight, which has only "
            f"{min(d, k)}; use r <= {min(d, k)} there (rank_pattern)"
        )
    if start == "orthogonal" and r % 2:
        raise ConfigError(
            f"init_lora_weights='orthogonal' needs an even rank (A and B each take half of an orthogonal r x r "
            f"basis), but {name!r} has r={r}; use r={r + 1} or r={r - 1}"
        )


def prepare(modules: list[tuple[str, nn.Module, LayerKind, int, str]], init: str, shared: bool) -> Callable[[], None]:
    """Check every module a start will run on, then keep what it will rewrite; return the function that restores it.

    Args:
        modules: ``(name, base layer, kind, rank, variant)`` per targeted module.
        shared: the model holds (or will hold) other adapters, which a rewritten base changes under them.

    Raises:
        ConfigError: see :func:`check_start` (nothing has changed yet).
    """
    running = [(n, base, kind, r) for n, base, kind, r, variant in modules if takes_start(kind, variant)]
    for name, base, kind, r in running:
        d, k = kind.features(base)[::-1]
        check_start(name, kind, (d, k), r, init)
    if not rewrites_base(init) or not running:
        return lambda: None
    if shared:
        warnings.warn(
            f"init_lora_weights={init!r} rewrites the base weights into residuals, which changes what the model's "
            "other adapters apply to (PEFT warns alike); convert it into a plain LoRA adapter with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to combine it with others",
            stacklevel=5,
        )
    kept = []
    for _, base, kind, _ in running:
        weight = kind.base_weight(base)
        if kind.quantized:  # OLoRA replaces the quantized parameter: keep the object itself
            kept.append((base, weight, getattr(base, "quant_state", None), None))
        else:
            kept.append((base, weight, None, weight.detach().clone()))

    @torch.no_grad()
    def restore() -> None:
        for base, weight, quant_state, data in kept:
            if data is None:
                base.weight = weight
                if quant_state is not None:
                    base.quant_state = quant_state
            else:
                weight.copy_(data)

    return restore


# -- running a start on one layer ---------------------------------------------------------------------------------


def run_start(layer: LoraLayer, adapter: str, init: bool | str, variant: str) -> bool:
    """Initialise ``adapter``'s A and B by the start ``init`` names (rewriting the base weight for PiSSA/OLoRA).

    Returns:
        False when ``init`` is not one of these starts or does not apply to this layer (an embedding, an AdaLoRA
        adapter): the caller then runs the kind's usual init.

    Raises:
        ConfigError: see :func:`check_start` (normally raised earlier, by the tuner, before any layer changed).
    """
    start = start_name(init)
    kind = layer.kind
    if start is None or not takes_start(kind, variant):
        return False
    r, s = layer.r[adapter], layer.scaling[adapter]
    check_start(adapter, kind, (layer.out_features, layer.in_features), r, init)
    a_param, b_param = kind.factor_params(layer, adapter)
    base = layer.base_layer
    if start == "orthogonal":
        a, b = orthogonal_factors(layer.in_features, layer.out_features, r)
        weight = kind.base_weight(base)
        if weight.is_floating_point():  # PEFT makes them in the base weight's dtype
            a, b = a.to(weight.dtype), b.to(weight.dtype)
    elif kind.quantized:
        a, b = _olora_quantized(layer, r, s)
    else:
        w = kind.weight_matrix(base).detach()  # (d, k)
        niter = pissa_niter(init) if start == "pissa" else None
        a, b = pissa_factors(w, r, s, niter) if start == "pissa" else olora_factors(w, r)
        weight = kind.base_weight(base)
        with torch.no_grad():
            weight.copy_(kind.to_weight_layout(residual(w, a, b, s), base).to(weight.dtype))
    with torch.no_grad():
        a_param.copy_(a.to(device=a_param.device, dtype=a_param.dtype))
        b_param.copy_(b.to(device=b_param.device, dtype=b_param.dtype))
    return True


def _olora_quantized(layer: LoraLayer, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA on a bitsandbytes layer (PEFT's way): dequantize W, factor it, and quantize ``W − s·BA`` again with
    the layer's settings, as a new parameter of the same class."""
    import bitsandbytes as bnb

    from lorakit.layers.quantized import dequantize_4bit_weight

    base, kind = layer.base_layer, layer.kind
    old = base.weight
    w = dequantize_4bit_weight(base) if kind.name == "linear4bit" else kind.dequantized_weight(base)
    dtype = w.dtype  # what the layer was quantized from
    a, b = olora_factors(w, r)
    rest = residual(w, a, b, s).contiguous()
    if kind.name == "linear4bit":
        new = bnb.nn.Params4bit(
            rest.to(dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        )
    else:
        new = bnb.nn.Int8Params(rest, requires_grad=False, has_fp16_weights=old.has_fp16_weights)
    base.weight = new.to(old.device)  # the move quantizes
    return a, b
