"""EVA's data pass (steps 1–3 of :mod:`lorakit.tuners.lora.eva`): forward hooks that feed each adapted layer's
inputs to an incremental PCA until its components converge, and the redistribution of ranks by explained variance
(Paischer et al. 2024, arXiv 2410.07170, §3).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.config import pattern_value
from lorakit.errors import ConfigError, DataError
from lorakit.tuners.lora.ipca import IncrementalPCA

#: Above this rho, the per-layer cap is also limited by the model's largest dimension (as PEFT).
_RHO_CEILING = 1000


def first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    """The tensor a layer was called with (the first positional argument)."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise DataError(
            f"EVA cannot read the input of {layer_name!r} (a {type(layer_input).__name__}); pass "
            "prepare_layer_inputs_fn returning a 2-d tensor"
        )
    return layer_input


def _all_rows(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """``prepare_layer_inputs_fn=None``: every row of the input, flattened to ``(…, d)`` → ``(n, d)``."""
    x = first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


# -- forward hooks ------------------------------------------------------------------------------------------


class _Hook:
    """Turns a layer's input into the rows EVA uses (``(n, d)``, gathered over ranks when distributed)."""

    def __init__(self, name: str, prepare: Callable | None, gather: bool) -> None:
        self.name = name
        self.prepare = prepare or _all_rows
        self.gather = gather
        self.model_input: Any = None

    @torch.no_grad()
    def rows(self, args: tuple) -> torch.Tensor:
        x = self.prepare(args, self.model_input, self.name)
        if not (self.gather and dist.is_available() and dist.is_initialized()):
            return x
        sizes = torch.empty(dist.get_world_size(), dtype=torch.long, device=x.device)
        dist.all_gather_into_tensor(sizes, torch.tensor([x.shape[0]], device=x.device))
        sizes = sizes.tolist()
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _HashHook(_Hook):
    """Fingerprints the first batch's input, to find layers that receive the same one (one PCA serves them)."""

    digest: str | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = self.rows(args).detach().cpu().contiguous()
        head = f"{x.dtype} {tuple(x.shape)}".encode()
        self.digest = hashlib.blake2b(head + x.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


class _PcaHook(_Hook):
    """One incremental-PCA step per batch; ``converged[i]``: component i moved less than tau (cosine) last step."""

    def __init__(self, name: str, prepare: Callable | None, gather: bool, n_components: int, tau: float) -> None:
        super().__init__(name, prepare, gather)
        self.n_components = n_components
        self.tau = tau
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @property
    def fitted(self) -> bool:
        return self.pca.components_ is not None

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = self.rows(args)
        if x.shape[0] < self.n_components:  # too few tokens in this batch for k components: wait for the next
            return
        previous = self.pca.components_
        self.pca.partial_fit(x.to(torch.float32))
        if previous is not None:
            sim = nn.functional.cosine_similarity(self.pca.components_, previous)
            self.converged = (sim >= self.tau).cpu()


# -- the SVD of every layer's inputs ---------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(f"EVA could not choose one device for the batches, the model is on {devices}", stacklevel=3)
        return None
    return next(iter(devices), None)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _rank_distribution(
    hooks: dict[str, _PcaHook], layer_hook: dict[str, str], shared: dict[str, str], budget: int, caps: dict[str, int]
) -> dict[str, int]:
    """Step 3: the ``budget`` largest explained-variance ratios over all layers (each at most its cap) decide the
    ranks; a layer sharing another's PCA never gets more than the layer holding it (their counts are swapped)."""
    ratios = {k: h.pca.explained_variance_ratio_[: caps[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, v) for k, hook in layer_hook.items() for v in ratios[hook]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {k: counts.get(k, 0) for k in layer_hook}
    for k, holder in shared.items():
        if ranks[holder] < ranks[k]:
            ranks[holder], ranks[k] = ranks[k], ranks[holder]
    return ranks


def svd_of_layer_inputs(
    model: nn.Module,
    dataloader: Iterable,
    config: Any,
    targets: list[str],
    forward_fn: Callable,
    prepare_model_inputs_fn: Callable | None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None,
    gather: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    """Steps 1–3 for the layers ``targets`` of ``model`` (arguments: :func:`lorakit.get_eva_state_dict`'s):
    ``{name: A₀ (r_i, d)}`` for the layers given a non-zero rank. The model runs in eval mode, restored after."""
    training = model.training
    model.eval()
    bar = None
    if show_progress_bar and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        from tqdm.auto import tqdm

        bar = tqdm(leave=False, desc="EVA")
    try:
        args = (forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, gather, bar)
        return _svd(model, dataloader, config, targets, *args)
    finally:
        model.train(training)
        if bar is not None:
            bar.close()


def _svd(
    model: nn.Module,
    dataloader: Iterable,
    config: Any,
    targets: list[str],
    forward_fn: Callable,
    prepare_model_inputs_fn: Callable | None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None,
    gather: bool,
    bar: Any,
) -> dict[str, torch.Tensor]:
    eva = config.eva_config
    rho = eva.rho
    if rho > _RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    device = _device(model)

    def model_input(batch: Any) -> Any:
        if device is not None:
            batch = _to_device(batch, device)
        return batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn else copy.deepcopy(batch))

    per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    caps: dict[str, int] = {}
    budget = 0
    hashes: dict[str, _HashHook] = {}
    for name in targets:
        fn = per_layer.pop(name, None) if per_layer is not None else prepare_layer_inputs_fn
        hashes[name] = _HashHook(name, fn, gather)
        rank = pattern_value(config.rank_pattern, name, config.r)
        caps[name] = round(rank * rho)
        budget += rank
    if per_layer:
        raise ConfigError(
            f"prepare_layer_inputs_fn names modules that are not layers EVA initialises: {sorted(per_layer)}; "
            f"those are: {targets[:10]}{' ...' if len(targets) > 10 else ''}"
        )

    # one batch fingerprints every layer's input: layers fed the same tensor (q, k, v) share one PCA
    batch, hashes_input = model_input(next(iter(dataloader)))
    handles = []
    try:
        for name, hook in hashes.items():
            hook.model_input = hashes_input
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str | None, list[str]] = {}
    for name, hook in hashes.items():
        groups.setdefault(hook.digest, []).append(name)
    shared = {other: names[0] for names in groups.values() if len(names) > 1 for other in names[1:]}
    for names in groups.values():
        cap = max(caps[n] for n in names)
        for n in names:
            caps[n] = cap
    hooks = {n: _PcaHook(n, hashes[n].prepare, gather, caps[n], eva.tau) for n in hashes if n not in shared}
    layer_hook = {**{n: n for n in hooks}, **shared}
    ranks = _collect(model, dataloader, hooks, layer_hook, shared, budget, caps, model_input, forward_fn, bar)
    state = {}
    for name, rank in ranks.items():
        hook = hooks[layer_hook[name]]
        if not bool(hook.converged[:rank].all()):  # cannot happen: _collect runs until they have
            raise RuntimeError(f"EVA: layer {name!r} was given rank {rank} before converging")
        u = hook.pca.components_[:rank]
        if eva.whiten:  # a new tensor: layers that share a PCA must not divide the same rows twice
            u = u / hook.pca.singular_values_[:rank].sqrt().view(-1, 1)
        state[name] = u.to(device) if device is not None else u
    return state


def _collect(
    model: nn.Module,
    dataloader: Iterable,
    hooks: dict[str, _PcaHook],
    layer_hook: dict[str, str],
    shared: dict[str, str],
    budget: int,
    caps: dict[str, int],
    model_input: Callable,
    forward_fn: Callable,
    bar: Any,
) -> dict[str, int]:
    """Steps 1–3: run batches (cycling the dataloader) until every layer's components that its current rank
    needs have converged; a converged layer's hook is taken off, and put back if a new rank needs more."""
    handles = {n: model.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()}
    done = dict.fromkeys(hooks, False)
    ranks = dict(caps)
    try:
        for step, batch in enumerate(cycle(dataloader)):
            batch, inputs = model_input(batch)
            for name, hook in hooks.items():
                converged = bool(hook.converged[: ranks[name]].all())
                if converged and not done[name]:
                    handles.pop(name).remove()
                    done[name] = True
                    continue
                if done[name] and not converged:
                    handles[name] = model.get_submodule(name).register_forward_hook(hook)
                    done[name] = False
                hook.model_input = inputs
            if bar is not None:
                layers_done = [*done.values(), *(done[h] for h in shared.values())]
                bar.set_description(f"EVA: {sum(layers_done)}/{len(layers_done)} layers converged")
                bar.update()
            if all(done.values()):
                return ranks
            forward_fn(model, batch)
            if not all(h.fitted for h in hooks.values()):
                if step + 1 >= len(dataloader):
                    short = [n for n, h in hooks.items() if not h.fitted]
                    raise DataError(
                        f"EVA: in a whole pass over the data, no batch gave layer {short[0]!r} the "
                        f"{hooks[short[0]].n_components} rows its PCA needs; use larger batches, or "
                        "EvaConfig(use_label_mask=False) if most positions are masked"
                    )
                continue
            ranks = _rank_distribution(hooks, layer_hook, shared, budget, caps)
    finally:
        for handle in handles.values():
            handle.remove()
    raise DataError("the dataloader given to EVA yielded no batch")
