"""CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv 2406.05223): a data-driven start that
splits each adapted weight into a frozen residual and the adapter, oriented by the layer's input covariance.

For a linear layer with weight ``W (d, k)`` (out, in) and rank r (§3.1–3.2 of the paper, PEFT's steps):

1. :func:`preprocess_corda` runs the model on sample data (``run_model``) with a forward hook on every targeted
   layer: each sample's input ``X (seq, k)`` is divided by its largest value and ``XᵀX (k, k)`` added up; the
   covariance is the mean over samples, ``C (k, k)``.
2. C is damped until it inverts well, ``C' = C + λ·mean(diag C)·I`` (λ = 0.01, doubled until
   ``‖C' C'⁻¹ − I‖ < 0.05``), and ``W C' = U S Vhᵀ`` is decomposed by SVD; ``V = (Vh C'⁻¹)ᵀ (k, min(d, k))``, so
   ``W = U S Vᵀ`` exactly.
3. ``corda_method="ipm"`` (instruction-previewed mode) keeps the r largest components, ``"kpm"``
   (knowledge-preserved mode) the r smallest: ``U_r (d, r)``, ``S_r (r,)``, ``V_r (k, r)``, attached to the layer
   as ``eigens`` (and written to ``cache_file``).
4. Creating the adapter (``init_lora_weights="corda"``, :func:`corda_initialize`) sets ``A = √(S_r/s) V_rᵀ (r, k)``,
   ``B = U_r √(S_r/s) (d, r)`` and writes the residual ``W − s·BA`` into the base weight, so the model's output is
   unchanged at the start. IPM trains the directions the task's data excites most; KPM freezes them (the
   knowledge the sample data stands for) and trains the least used ones.

Loading a saved CorDA adapter does what PEFT does: the start runs again on the base it is loaded onto, which
therefore needs ``eigens`` from :func:`preprocess_corda` (same data, or its ``cache_file``); the file's A and B
then replace the start's. To load onto a base without preprocessing, load onto the residual model saved at
creation with a config whose ``init_lora_weights`` is True (PEFT's ``preprocess.py`` does so).

Files: the covariance and cache files hold a plain ``{name: tensor}`` dict. A name ending in ``.safetensors`` is
written as safetensors, any other in PEFT's ``torch.save`` form (so PEFT reads it); both are read without running
code (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.config import pattern_value
from lorakit.errors import AdapterFileError, ConfigError, DataError
from lorakit.io import atomic_write_bytes
from lorakit.layers.kinds import HFConv1D
from lorakit.targeting import select_targets
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.subconfigs import CordaConfig

__all__ = ["CordaConfig", "CordaEigens", "corda_initialize", "preprocess_corda"]

#: Damping λ starts here and doubles until C' inverts with ‖C' C'⁻¹ − I‖ below the tolerance (PEFT's values).
_DAMP, _INV_TOLERANCE, _MAX_DOUBLINGS = 0.01, 0.05, 60
_KEYS = ("S_WC", "U_WC", "V_WC")


@dataclass
class CordaEigens:
    """One layer's cropped decomposition (PEFT's names): ``S_WC (r,)``, ``U_WC (d, r)``, ``V_WC (k, r)``."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _linear(module: nn.Module) -> nn.Module | None:
    """The ``nn.Linear`` / ``Conv1D`` a target stands for (inside a lorakit layer: its base), else None."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    linear = (nn.Linear,) if HFConv1D is None else (nn.Linear, HFConv1D)
    return module if isinstance(module, linear) else None


def corda_targets(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    """``(name, linear)`` of every module ``config`` targets that CorDA decomposes (linears and ``Conv1D``)."""
    found = [(name, _linear(model.get_submodule(name))) for name in select_targets(model, config)]
    return [(name, m) for name, m in found if m is not None]


def _weight_matrix(linear: nn.Module) -> torch.Tensor:
    """W as ``(d, k)`` = (out, in) in float32 (transformers' ``Conv1D`` stores it transposed)."""
    w = linear.weight.detach().float()
    return w.t() if HFConv1D is not None and isinstance(linear, HFConv1D) else w


# -- files ------------------------------------------------------------------------------------------------------


def _read_tensors(path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` file written by lorakit or PEFT, read without running code."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save (zip, or the legacy pickle)
            state = torch.load(path, map_location=device, weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(path, device=str(device))
    except Exception as exc:  # torch.load(weights_only=True) raises UnpicklingError for anything but tensors
        raise AdapterFileError(f"cannot read CorDA file {path!r} as tensors: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFileError(f"CorDA file {path!r} does not hold a dict of tensors")
    return state


def _write_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` atomically: safetensors for a ``.safetensors`` name, else ``torch.save`` (PEFT's form)."""
    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        blob = save(data, metadata={"format": "pt"})
    else:
        buffer = io.BytesIO()
        torch.save(data, buffer)
        blob = buffer.getvalue()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, blob)


def _exists(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


# -- step 1: covariances --------------------------------------------------------------------------------------------


class _CovarianceHook:
    """Adds ``XᵀX`` of each sample's input ``X (seq, k)``, scaled by its largest value, to a running sum."""

    def __init__(self, name: str, half: bool) -> None:
        self.name, self.half = name, half
        self.total: torch.Tensor | int = 0
        self.count = 0

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0].detach()
        samples = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]  # (samples, seq, k)
        for sample in samples:
            if not self.half:
                sample = sample.float()
            sample = sample / torch.max(sample).abs()
            cov = sample.t() @ sample
            if not torch.isfinite(cov).all():
                raise DataError(
                    f"CorDA: the input of {self.name!r} gave a non-finite covariance (NaN/Inf inputs, or an all-zero "
                    "sample); check the sample data"
                )
            self.total = self.total + cov
            self.count += 1


@torch.no_grad()
def _covariances(
    model: nn.Module, config: Any, run_model: Callable[[], Any] | None, hooked_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """Step 1: ``{name: C (k, k)}`` for every target, from ``covariance_file`` when it exists."""
    corda: CordaConfig = config.corda_config
    targets = corda_targets(model, config)
    if _exists(corda.covariance_file):
        stored = _read_tensors(corda.covariance_file, _device(model))
        missing = [n for n, _ in targets if n not in stored]
        if missing:
            raise AdapterFileError(f"CorDA covariance file {corda.covariance_file!r} has no entry for {missing[0]!r}")
        return {n: stored[n] for n, _ in targets}
    if run_model is None:
        raise ConfigError(
            "preprocess_corda needs run_model (a callable that runs the model on sample data) unless "
            "corda_config.cache_file or covariance_file names an existing file"
        )
    hooked = model if hooked_model is None else hooked_model
    hooks = {n: _CovarianceHook(n, corda.use_float16_for_covariance) for n, _ in corda_targets(hooked, config)}
    handles = [hooked.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()]
    training = hooked.training
    hooked.eval()
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(training)
    covariances = {}
    for name, _ in targets:
        hook = hooks.get(name)
        if hook is None or hook.count == 0:
            raise DataError(f"CorDA: run_model never ran layer {name!r}, so it has no covariance")
        covariances[name] = hook.total / hook.count
    if corda.covariance_file is not None:
        _write_tensors(corda.covariance_file, covariances)
    return covariances


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


# -- steps 2-3: the decomposition ---------------------------------------------------------------------------------


@torch.no_grad()
def decompose(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2 for one layer: ``(U (d, m), S (m,), V (k, m))``, m = min(d, k), with ``W = U diag(S) Vᵀ`` and
    ``U S Vhᵀ`` the SVD of ``W C'`` (C' the damped covariance, ``V = (Vh C'⁻¹)ᵀ``).

    Args:
        weight: W ``(d, k)``; covariance: C ``(k, k)``.

    Raises:
        DataError: C cannot be made invertible (it is zero or not finite).
    """
    cov = covariance.float()
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = _DAMP
    for _ in range(_MAX_DOUBLINGS):
        damped = cov + eye * (torch.mean(torch.diag(cov)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < _INV_TOLERANCE:
            break
        damp *= 2
    else:
        raise DataError("CorDA: a layer's input covariance cannot be inverted (all-zero or non-finite inputs)")
    u, s, vh = torch.linalg.svd(weight.float().to(cov.device) @ damped, full_matrices=False)
    return u, s, (vh @ inverse).t()


def _crop(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int, method: str) -> CordaEigens:
    """Step 3: the r largest (``"ipm"``) or smallest (``"kpm"``) components, as copies."""
    if method not in ("ipm", "kpm"):
        raise ConfigError(f"corda_config.corda_method={method!r} is invalid; accepted: 'ipm' or 'kpm'")
    part = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(S_WC=s[part].clone(), U_WC=u[:, part].clone(), V_WC=v[:, part].clone())


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], Any] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Steps 1–3 of CorDA: attach ``eigens`` (:class:`CordaEigens`) to every layer ``lora_config`` targets, for
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` to use (PEFT's API).

    Args:
        model: the model that will get the adapter (before ``get_peft_model``).
        lora_config: a :class:`~lorakit.LoraConfig` with ``corda_config`` (targets, ``r`` and ``rank_pattern`` give
            each layer's rank).
        run_model: runs the model on the sample data (e.g. 256 samples, one per call, of the target task for
            ``"ipm"`` or of the knowledge to keep for ``"kpm"``); may be None when ``cache_file`` or
            ``covariance_file`` exists. Padding positions count as data: prefer unpadded samples.
        hooked_model: a different model to record the inputs from (its modules named as ``model``'s).

    Raises:
        ConfigError: no ``corda_config``, neither ``run_model`` nor a file to read, an unknown ``corda_method``,
            or a rank above a layer's ``min(d, k)``.
        DataError: a target the data never reached, or inputs that give no usable covariance.
        AdapterFileError: a cache or covariance file that cannot be read or lacks a target.
    """
    corda: CordaConfig | None = getattr(lora_config, "corda_config", None)
    if corda is None:
        raise ConfigError("preprocess_corda needs lora_config.corda_config (a CordaConfig)")
    targets = corda_targets(model, lora_config)
    device = _device(model)
    if _exists(corda.cache_file):
        cache = _read_tensors(corda.cache_file, device)
        for name, linear in targets:
            keys = [f"{name}.eigens.{k}" for k in _KEYS]
            if not all(k in cache for k in keys):
                raise AdapterFileError(f"CorDA cache file {corda.cache_file!r} has no decomposition of {name!r}")
            linear.eigens = CordaEigens(*(cache[k] for k in keys))
        return
    if corda.corda_method is None:
        raise ConfigError("corda_config.corda_method is needed ('ipm' or 'kpm') when there is no cache_file to read")
    covariances = _covariances(model, lora_config, run_model, hooked_model)
    for name, linear in targets:
        rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
        w = _weight_matrix(linear)
        if rank > min(w.shape):
            raise ConfigError(
                f"CorDA takes r={rank} components of {name!r}, whose {w.shape[0]}x{w.shape[1]} weight has "
                f"{min(w.shape)}; use r <= {min(w.shape)} there (rank_pattern)"
            )
        u, s, v = decompose(w, covariances[name])
        linear.eigens = _crop(u, s, v, rank, corda.corda_method)
        if not corda.prune_temporary_fields:  # PEFT's attribute names, for inspection
            linear.covariance_matrix, linear.corda_method, linear.rank = covariances[name], corda.corda_method, rank
    if corda.cache_file is not None:
        _write_tensors(
            corda.cache_file,
            {f"{n}.eigens.{k}": getattr(m.eigens, k) for n, m in targets for k in _KEYS},
        )


# -- step 4: the adapter and the residual --------------------------------------------------------------------------


def check_corda_ready(name: str, base: nn.Module, kind: Any, r: int) -> None:
    """Refuse, before anything changes, a CorDA start on module ``name`` that cannot run.

    Raises:
        ConfigError: not a full-precision linear, no ``eigens`` (preprocess_corda was not run on this model), or
            eigens of another shape than ``(d, r)``, ``(r,)``, ``(k, r)``.
    """
    if kind.quantized or kind.name not in ("linear", "conv1d_hf") or _linear(base) is None:
        raise ConfigError(
            f"init_lora_weights='corda' initialises full-precision linear layers (nn.Linear, transformers Conv1D), "
            f"not {name!r} ({type(base).__name__}); narrow target_modules (as in PEFT), and quantize the residual "
            "model afterwards"
        )
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"CorDA needs a float32/float16/bfloat16 weight; {name!r} has {base.weight.dtype}")
    eigens = getattr(base, "eigens", None)
    if eigens is None:
        raise ConfigError(
            f"init_lora_weights='corda' needs preprocess_corda(model, config, run_model=...) first: {name!r} has no "
            "decomposition. A saved CorDA adapter also needs it (same data, or the cache_file) on the original base, "
            "as in PEFT; or load it onto the residual model saved at creation with init_lora_weights=True"
        )
    d, k = _weight_matrix(base).shape
    expected = {"U_WC": (d, r), "S_WC": (r,), "V_WC": (k, r)}
    for key, shape in expected.items():
        tensor = getattr(eigens, key)
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"CorDA's {key} of {name!r} has shape {tuple(tensor.shape)}, expected {shape} for rank {r}: "
                "preprocess_corda (or its cache_file) was run with another model or rank than this config"
            )
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"CorDA's {key} of {name!r} holds NaN or Inf; rerun preprocess_corda")


def keep_corda_bases(modules: list[tuple[str, nn.Module, Any, int]], shared: bool = False) -> Callable[[], None]:
    """Check every ``(name, base layer, kind, rank)`` CorDA will start (:func:`check_corda_ready`), keep their
    weights and eigens, and return what puts them back (a failed injection leaves the model as it was).

    Args:
        shared: the model holds other adapters, whose base the residuals change (warned, as PEFT warns).
    """
    for name, base, kind, r in modules:
        check_corda_ready(name, base, kind, r)
    if shared:
        warnings.warn(
            "init_lora_weights='corda' rewrites the base weights into residuals, which changes what the model's other "
            "adapters apply to (PEFT warns alike); keep a CorDA adapter on a model of its own",
            stacklevel=4,
        )
    kept = [(base, base.weight.detach().clone(), base.eigens) for _, base, _, _ in modules]

    @torch.no_grad()
    def restore() -> None:
        for base, weight, eigens in kept:
            base.weight.copy_(weight)
            base.eigens = eigens

    return restore


@torch.no_grad()
def corda_initialize(layer: LoraLayer, adapter: str) -> None:
    """Step 4 on one layer: A and B from the base layer's ``eigens`` (then dropped), and the residual W − s·BA
    written into the base weight.

    Raises:
        ConfigError: see :func:`check_corda_ready`.
    """
    base, kind = layer.base_layer, layer.kind
    r, s = layer.r[adapter], layer.scaling[adapter]
    check_corda_ready(f"the {type(base).__name__} of adapter {adapter!r}", base, kind, r)
    eigens = base.eigens
    weight = kind.base_weight(base)
    root = (eigens.S_WC.float() / s).sqrt().to(weight.device)
    a = eigens.V_WC.float().to(weight.device).t() * root.view(-1, 1)  # (r, k)
    b = eigens.U_WC.float().to(weight.device) * root  # (d, r)
    rest = _weight_matrix(base) - (s * b) @ a
    weight.copy_(kind.to_weight_layout(rest, base).to(weight.dtype))
    a_param, b_param = kind.factor_params(layer, adapter)
    a_param.copy_(a.to(a_param.dtype))
    b_param.copy_(b.to(b_param.dtype))
    del base.eigens
