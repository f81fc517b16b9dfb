"""Adapter arithmetic: ``add_weighted_adapter`` (PEFT's name and arguments), a new adapter from weighted others.

Per adapted layer, with weights w_i and the adapters' own scales s_i (rsLoRA's α/√r included):

* ``cat``: A' = [w_1 s_1 A_1; …], B' = [B_1, …]: exactly ΔW' = Σ w_i s_i B_i A_i, at rank Σ r_i;
* ``svd`` and the ``*_svd`` family: the adapters' updates ΔW_i (for DoRA, the whole change W'_i − W that its
  magnitude and direction make) merged by the method, then the best rank-``svd_rank`` approximation (SVD);
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the method applied to the A's
  (weighted by sign(w s)·√|w s|) and the B's (by √|w s|) separately, at the common rank — PEFT's approximation:
  products of sums are not sums of products, so only ``cat`` and ``svd`` reproduce Σ w_i ΔW_i.

The methods (TIES, arXiv 2306.01708; DARE, arXiv 2311.03099): ``magnitude_prune`` keeps the ``density``
fraction of largest-magnitude entries of each task tensor; ``ties`` does that, elects a sign per entry and
averages the entries that agree with it; ``dare_*`` drop entries at random (kept ones rescaled by 1/density).
Differences from PEFT, on purpose: TIES elects signs on the *weighted* tensors (PEFT's unweighted election lets a
negatively weighted adapter vote with its original sign); the new adapter has s = 1 whatever ``use_rslora`` said
(PEFT keeps rsLoRA and so scales the result by √r); DoRA adapters combine through their whole update (``svd``
family) and are refused by the factor-wise methods, which cannot express a rescaled direction.

Adapters with a bias on B (``lora_bias``) combine exactly with ``cat`` and ``svd``, whose results are sums of the
sources' outputs: the new B's bias is ``Σ w_i s_i b_i`` (PEFT leaves it at zero, dropping the sources' biases);
the entry-wise methods have no counterpart for a bias and refuse them. Grouped convolutions are refused: their
block-diagonal B has no place in the concatenation or the SVD.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import ConfigError, MergeError
from lorakit.tuners.lora.layer import LoraLayer

if TYPE_CHECKING:
    from lorakit.tuners.lora.model import LoraModel

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATIONS = ("svd", "cat", *FACTORWISE, *(f"{m}_svd" for m in FACTORWISE[1:]))


def merge_task_tensors(
    method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign_method: str
) -> torch.Tensor:
    """One tensor from ``tensors`` (same shape) by ``method`` (``linear``, ``ties``, ``dare_linear``,
    ``dare_ties``, ``magnitude_prune``), each tensor weighted by ``weights[i]``."""
    stacked = torch.stack(tensors)
    w = weights.to(stacked).view((-1,) + (1,) * (stacked.dim() - 1))
    if method == "linear":
        return (stacked * w).sum(0)
    if density < 1:
        if method.startswith("dare"):  # random drop, survivors rescaled so the expectation is kept
            keep = torch.stack([torch.bernoulli(torch.full_like(t, density)) for t in stacked])  # one draw per tensor
            stacked = stacked * keep / density
        else:  # keep the density fraction of largest magnitudes, per tensor
            k = int(density * stacked[0].numel())
            flat = stacked.reshape(len(tensors), -1)
            keep = torch.zeros_like(flat)
            keep.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
            stacked = (flat * keep).view_as(stacked)
    weighted = stacked * w
    if method in ("ties", "dare_ties"):
        votes = weighted.sum(0) if sign_method == "total" else weighted.sign().sum(0)
        agree = weighted.sign() == torch.where(votes >= 0, 1.0, -1.0)
        return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    return weighted.sum(0)


def effective_delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """The whole change adapter ``adapter`` makes to the layer's ``(d, k)`` weight matrix, in float32: s·BA, or
    for DoRA m ⊙ (W + s·BA)/‖W + s·BA‖ − W."""
    variant = layer.variant[adapter]
    a, b = (f.detach().float() for f in variant.factors(layer, adapter))
    delta = layer.scaling[adapter] * (b @ a)
    scale = variant.output_scale(layer, adapter)
    if scale is None:
        return delta
    w = layer.kind.weight_matrix(layer.base_layer).detach().float()
    return scale.detach().float().reshape(-1, 1) * (w + delta) - w


def add_weighted_adapter(
    lora_model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name`` = the ``weights``-weighted combination of ``adapters`` (see the module doc).

    The new adapter is frozen (as in PEFT) and not made active. On any error the model is left as it was.

    Raises:
        AdapterNotFoundError / AdapterExistsError: unknown source names, or ``adapter_name`` taken.
        ConfigError: bad weights, combination type, density or sign method; ranks that differ for the factor-wise
            methods; DoRA adapters with a factor-wise method; sources that train whole modules (modules_to_save).
        MergeError: a source adapter is merged into the base weights.
    """
    configs = lora_model.peft_config
    method, new_rank = _check(lora_model, adapters, weights, adapter_name, combination_type, svd_rank, density)
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={majority_sign_method!r}; accepted: 'total', 'frequency'")
    first = configs[adapters[0]]
    targets = [configs[a].target_modules for a in adapters]
    if all(isinstance(t, str) for t in targets):
        target_modules: Any = targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    elif all(isinstance(t, (list, set, tuple)) for t in targets):
        target_modules = sorted({name for t in targets for name in t})
    else:
        raise ConfigError("the adapters' target_modules mix names and regexes; combine adapters targeted alike")
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,  # s = α/r = 1: the factors below carry every scale
        use_rslora=False,
        use_dora=False,
        dora_grad_through_norm=False,
        lora_bias=any(configs[a].lora_bias for a in adapters),
        init_lora_weights=True,
        loftq_config={},
        target_modules=target_modules,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    configs[adapter_name] = config
    try:
        lora_model.inject(adapter_name, config)
        with torch.no_grad():
            for _, layer in lora_model.lora_layers():
                if adapter_name in layer.r:
                    _fill(layer, adapters, weights, adapter_name, combination_type, method, svd_clamp,
                          svd_full_matrices, svd_driver, density, majority_sign_method)  # fmt: skip
    except BaseException:
        if any(adapter_name in layer.r for _, layer in lora_model.lora_layers()):
            lora_model.remove_adapter_layers(adapter_name)
        del configs[adapter_name]
        raise
    lora_model.set_adapter(lora_model.active_adapters)  # the new adapter stays frozen and inactive


def _check(
    lora_model: LoraModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
    density: float | None,
) -> tuple[str, int]:
    lora_model._check_weighted_sources(adapters, weights, adapter_name)
    configs = lora_model.peft_config
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r} is not known; accepted: {', '.join(COMBINATIONS)}")
    method = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
    if method != "linear" and combination_type != "cat" and (density is None or not 0 < density <= 1):
        raise ConfigError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    for name in adapters:
        if configs[name].modules_to_save:
            raise ConfigError(f"adapter {name!r} trains whole modules (modules_to_save); they cannot be combined")
    layers = [layer for _, layer in lora_model.lora_layers()]
    merged = sorted({a for layer in layers for a in layer.merged_adapters if a in adapters})
    if merged:
        raise MergeError(f"adapters {merged} are merged into the base weights; unmerge them first")
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type.endswith("svd"):
        new_rank = svd_rank or max(ranks)
    else:
        if len(set(ranks)) > 1:
            raise ConfigError(
                f"combination_type={combination_type!r} combines A's and B's entry by entry, so the ranks must be "
                f"equal; got {dict(zip(adapters, ranks))}. Use 'cat' or 'svd' for adapters of different ranks"
            )
        new_rank = ranks[0]
    biased = [a for a in adapters if configs[a].lora_bias]
    if biased and combination_type not in ("cat", "svd"):
        raise ConfigError(
            f"adapters {biased} have a bias on B (lora_bias=True), which {combination_type!r} (entry by entry) cannot "
            "combine; use combination_type='cat' or 'svd', whose bias is the weighted sum of the sources' s·b_B"
        )
    grouped = sorted(
        name
        for name, layer in lora_model.lora_layers()
        if getattr(layer.base_layer, "groups", 1) > 1 and any(a in layer.r for a in adapters)
    )
    if grouped:
        raise ConfigError(
            f"the adapters sit on grouped convolutions ({grouped[0]!r}…), whose block-diagonal B no combination "
            "can hold; combine adapters that do not target them"
        )
    dora = [a for a in adapters if configs[a].use_dora]
    if dora and not combination_type.endswith("svd"):
        raise ConfigError(
            f"DoRA adapters {dora} change the weight by a rescaled direction, which {combination_type!r} cannot "
            "express; use combination_type='svd' (or a *_svd method), which combines their whole updates"
        )
    return method, new_rank


def _fill(
    layer: LoraLayer,
    adapters: list[str],
    weights: list[float],
    new: str,
    combination_type: str,
    method: str,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
    density: float | None,
    sign_method: str,
) -> None:
    """Write the combination into ``new``'s factors on one layer (zeros where no source adapter is present)."""
    a_new, b_new = layer.kind.factor_params(layer, new)
    a_flat, b_flat = layer.variant[new].factors(layer, new)  # (R, k), (d, R) views of the same storage
    a_rows, b_cols = torch.zeros_like(a_flat, dtype=torch.float32), torch.zeros_like(b_flat, dtype=torch.float32)
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    if present and combination_type == "cat":
        parts = [layer.variant[a].factors(layer, a) for a, _ in present]
        a_cat = torch.cat([w * layer.scaling[a] * p[0].float() for (a, w), p in zip(present, parts)])
        b_cat = torch.cat([p[1].float() for p in parts], dim=1)
        a_rows[: a_cat.shape[0]], b_cols[:, : b_cat.shape[1]] = a_cat, b_cat
    elif present and combination_type.endswith("svd"):
        deltas = [effective_delta(layer, a) for a, _ in present]
        merged = merge_task_tensors(method, deltas, torch.tensor([w for _, w in present]), density, sign_method)
        u, s, vh = torch.linalg.svd(merged, full_matrices=full_matrices, driver=driver)
        r = min(a_rows.shape[0], s.shape[0])
        u, vh = u[:, :r] * s[:r], vh[:r]
        if clamp is not None:
            high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
            u, vh = u.clamp(-high, high), vh.clamp(-high, high)
        a_rows[:r], b_cols[:, :r] = vh, u
    elif present:
        scaled = [w * layer.scaling[a] for a, w in present]
        w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])
        w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
        parts = [layer.variant[a].factors(layer, a) for a, _ in present]
        a_rows = merge_task_tensors(method, [p[0].float() for p in parts], w_a, density, sign_method)
        b_cols = merge_task_tensors(method, [p[1].float() for p in parts], w_b, density, sign_method)
    a_new.copy_(a_rows.reshape(a_new.shape))
    b_new.copy_(b_cols.reshape(b_new.shape))
    b_bias = layer.kind.b_bias(layer, new)
    if b_bias is not None:  # cat / svd only: the outputs add up, and so do the biases (the new scale is 1)
        biases = [(layer.kind.b_bias(layer, a), w * layer.scaling[a]) for a, w in present]
        b_bias.copy_(
            sum((b.float() * c for b, c in biases if b is not None), torch.zeros_like(b_bias, dtype=torch.float32))
        )
