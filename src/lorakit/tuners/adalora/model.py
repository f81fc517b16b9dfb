"""AdaLoRA's schedule (Zhang et al. 2023, arXiv 2303.10512): importance, budget, masks, truncation.

The layers hold each adapter in SVD form (:mod:`lorakit.tuners.adalora.layer`); this module decides which of the
triplets (A_i, λ_i, B_i) survive. Paper §3.2–3.3 and Algorithm 1, with PEFT's conventions:

* sensitivity of every adapter weight, I = |w · ∂L/∂w|, smoothed Ī ← β1 Ī + (1 − β1) I, and its uncertainty
  Ū ← β2 Ū + (1 − β2) |I − Ī|; a weight's score is Ī · Ū;
* a triplet's score S_i = s(λ_i) + mean_j s(A_ij) + mean_k s(B_ki);
* the total budget b(t) (kept triplets over all layers) stays at init_r × layers until ``tinit``, falls
  cubically, b(t) = target + (init − target)(1 − (t − tinit)/(T − tfinal − tinit))³, and is ``target_r`` ×
  layers from T − tfinal on; every ``deltaT`` steps the triplets scoring at or below the (init − b(t))-th
  smallest score are masked (λ_i = 0);
* ``orth_reg_weight`` · mean over factors of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F is added to the training loss.

What PEFT leaves to the user, lorakit does itself: :class:`AdaLoraModel` runs ``update_and_allocate`` after
every optimizer step of any optimizer that holds its parameters (the HF ``Trainer``, accelerate, a plain
loop), masked triplets can be removed for good (:meth:`AdaLoraModel.truncate`), and
:meth:`AdaLoraModel.lora_equivalent` turns the result into a plain LoRA adapter with a ``rank_pattern``.
"""

from __future__ import annotations

import io
import math
import os
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lorakit.config import PeftType, register_method
from lorakit.errors import ConfigError
from lorakit.io import atomic_write_bytes
from lorakit.tuners.adalora.config import AdaLoraConfig
from lorakit.tuners.adalora.layer import truncate
from lorakit.tuners.lora.config import LoraConfig
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.model import LoraModel


def budget_schedule(config: AdaLoraConfig, init_budget: int, target_budget: int, step: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at optimizer step ``step`` (paper eq. 11; PEFT's integer rounding).

    Args:
        init_budget: the triplets at the start (init_r × adapted matrices); target_budget: target_r × matrices.
    """
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        return init_budget, False
    if step > end:
        return target_budget, True
    progress = 1 - (step - config.tinit) / (end - config.tinit)
    budget = int((init_budget - target_budget) * progress**3 + target_budget)
    return budget, step % config.deltaT == 0


class RankAllocator:
    """Smoothed importance of every triplet of one adapter, and the masks that keep a budget of them."""

    def __init__(self, config: AdaLoraConfig, layers: dict[str, LoraLayer], adapter: str) -> None:
        self.config = config
        self.adapter = adapter
        self.layers = dict(sorted(layers.items()))
        self.init_budget = sum(layer.r[adapter] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def _factors(self, layer: LoraLayer) -> dict[str, nn.Parameter]:
        a, b = layer.kind.factor_params(layer, self.adapter)
        return {"A": a, "B": b, "E": layer.lora_E[self.adapter]}

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold the current gradients into Ī and Ū (call after backward, before the gradients are cleared)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers.items():
            for which, p in self._factors(layer).items():
                if p.grad is None:
                    continue
                key = (name, which)
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt.get(key)
                unc = self.exp_avg_unc.get(key)
                if avg is None or avg.shape != p.shape:
                    avg, unc = torch.zeros_like(p), torch.zeros_like(p)
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer, ``(r,)``: λ_i's score plus the mean scores of A's row i and B's column i."""
        out = {}
        for name, layer in self.layers.items():
            keys = [(name, w) for w in ("A", "B", "E")]
            if not all(k in self.exp_avg_ipt for k in keys):  # no gradient seen yet: nothing to rank by
                out[name] = torch.zeros(layer.r[self.adapter])
                continue
            s_a, s_b, s_e = (self.exp_avg_ipt[k] * self.exp_avg_unc[k] for k in keys)
            out[name] = (s_e.view(-1) + (s_a.mean(dim=1) + s_b.mean(dim=0))).float().cpu()
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet scoring at or below the (init − budget)-th smallest score; the rank pattern."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -math.inf
        pattern = {}
        for name, layer in self.layers.items():
            keep = scores[name] > threshold
            e = layer.lora_E[self.adapter]
            e.masked_fill_(~keep.view(-1, 1).to(e.device), 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Zero λ of the triplets ``pattern`` drops (the optimizer moves them off zero between steps)."""
        for name, layer in self.layers.items():
            mask = pattern.get(f"{name}.lora_E")
            e = layer.lora_E[self.adapter]
            if mask is not None and len(mask) == e.shape[0]:
                keep = torch.tensor(mask, dtype=torch.bool, device=e.device)
                e.masked_fill_(~keep.view(-1, 1), 0.0)


#: The heatmap of kept ranks written next to a trained AdaLoRA adapter.
RANKS_PLOT = "adalora_ranks.png"


class AdaLoraModel(LoraModel):
    """The model with AdaLoRA adapters (PEFT's class name): one trainable adapter at a time, plus any number
    loaded for inference.

    Attributes:
        rankallocator: the trainable adapter's :class:`RankAllocator` (None when every adapter is frozen).
        budget_history: ``(step, budget)`` at every allocation, for plots and tests.
    """

    config_class = AdaLoraConfig

    def __init__(
        self,
        model: nn.Module,
        peft_config: dict[str, LoraConfig],
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        self._init_done = False
        super().__init__(model, peft_config, adapter_name, autocast_adapter_dtype)
        self.trainable_adapter_name: str | None = None
        self.rankallocator: RankAllocator | None = None
        self.budget_history: list[tuple[int, int]] = []
        self.auto_allocate = True  # until update_and_allocate is called by hand
        self._optimizer_steps = 0
        self._stepped_since_forward = False
        self._optimizers: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._init_done = True
        self._start_allocator(adapter_name)
        ref = weakref.ref(self)

        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            owner = ref()
            if owner is not None:
                owner._after_optimizer_step(optimizer)

        self._step_hook = register_optimizer_step_post_hook(after_step)  # every optimizer; filtered above
        weakref.finalize(self, self._step_hook.remove)  # the hook goes when the model does

    # -- injection ------------------------------------------------------------------------------------

    def _check_config_type(self, config: LoraConfig) -> None:
        if config.peft_type != PeftType.ADALORA:
            raise ConfigError(
                f"this model holds AdaLoRA adapters; a {config.peft_type.value} adapter cannot join them (PEFT "
                "keeps one method per model as well): use an AdaLoraConfig, or a separate model"
            )

    def inject(self, adapter_name: str, config: LoraConfig) -> None:
        self._check_config_type(config)
        if not config.inference_mode and getattr(self, "trainable_adapter_name", None):
            raise ConfigError(
                f"adapter {self.trainable_adapter_name!r} is already the trainable AdaLoRA adapter; AdaLoRA trains "
                "one at a time: add this one with inference_mode=True"
            )
        super().inject(adapter_name, config)
        if self._init_done:
            self._start_allocator(adapter_name)

    def _layer_form(self, config: LoraConfig, name: str) -> tuple[int, str]:
        return config.init_r, "adalora"

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError("add_weighted_adapter combines LoRA adapters; export AdaLoRA ones first (export_lora)")

    def _after_inject(self, adapter_name: str, config: LoraConfig) -> None:
        """A config with a ``rank_pattern`` (a trained adapter being loaded) gets its kept ranks at once."""
        if config.rank_pattern:
            self._truncate(adapter_name, config.rank_pattern, strict=True)

    def _start_allocator(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        if config.inference_mode:
            return
        self.trainable_adapter_name = adapter_name
        self.rankallocator = RankAllocator(config, self._layers_with(adapter_name), adapter_name)

    def _adapter_or_default(self, adapter_name: str | None) -> str:
        """``adapter_name``, else the trainable adapter, else the first active one."""
        return adapter_name or self.trainable_adapter_name or self.active_adapters[0]

    def _layers_with(self, adapter: str) -> dict[str, LoraLayer]:
        return {name: layer for name, layer in self.lora_layers() if adapter in layer.r}

    def remove_adapter_layers(self, adapter_name: str) -> None:
        super().remove_adapter_layers(adapter_name)
        if adapter_name == getattr(self, "trainable_adapter_name", None):
            self.trainable_adapter_name, self.rankallocator = None, None

    # -- training -------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        if not self.training:
            return outputs
        self._stepped_since_forward = False
        adapter = self.trainable_adapter_name
        loss = getattr(outputs, "loss", None)
        if adapter is not None and isinstance(loss, torch.Tensor):
            weight = self.peft_config[adapter].orth_reg_weight
            if weight > 0:
                outputs.loss = loss + weight * self.orthogonal_penalty(adapter)
        return outputs

    def orthogonal_penalty(self, adapter: str | None = None) -> torch.Tensor:
        """mean over the adapter's factors of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (paper eq. 4)."""
        adapter = self._adapter_or_default(adapter)
        terms = []
        for layer in self._layers_with(adapter).values():
            if layer.r[adapter] == 0:
                continue
            a, b = layer.kind.factor_params(layer, adapter)
            for cov in (a @ a.t(), b.t() @ b):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not (self.auto_allocate and self.training and self.rankallocator is not None):
            return
        holds = self._optimizers.get(optimizer)
        if holds is None:
            ours = {
                id(p)
                for layer in self.rankallocator.layers.values()
                for p in self.rankallocator._factors(layer).values()
            }
            holds = any(id(p) in ours for group in optimizer.param_groups for p in group["params"])
            self._optimizers[optimizer] = holds
        if not holds:
            return
        self._optimizer_steps += 1
        self._allocate(self._optimizer_steps)
        self._stepped_since_forward = True

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's call: update the importance scores and mask to the budget of ``global_step``.

        Call it after ``optimizer.step()`` and before ``zero_grad()``, as with PEFT. lorakit already does this
        by itself after every optimizer step; the first explicit call hands the schedule to the caller (if
        this step was already done automatically, the call does nothing).
        """
        if self.rankallocator is None:
            raise ConfigError("no trainable AdaLoRA adapter (all were added with inference_mode=True)")
        self.auto_allocate = False
        if self._stepped_since_forward:
            self._stepped_since_forward = False
            return
        self._allocate(global_step)

    def _allocate(self, step: int) -> None:
        allocator = self.rankallocator
        config = self.peft_config[self.trainable_adapter_name]
        end = config.total_step - config.tfinal
        if step < end:
            allocator.update_importance()
            budget, mask = budget_schedule(config, allocator.init_budget, allocator.target_budget, step)
            if mask:
                config.rank_pattern = allocator.mask_to_budget(budget)
                self.budget_history.append((step, budget))
        elif step == end:
            budget, _ = budget_schedule(config, allocator.init_budget, allocator.target_budget, step)
            config.rank_pattern = allocator.mask_to_budget(budget)
            self.budget_history.append((step, budget))
            allocator.reset()
        elif config.rank_pattern:
            allocator.apply_pattern(config.rank_pattern)

    # -- the result -----------------------------------------------------------------------------------

    def truncate(self, adapter_name: str | None = None) -> dict[str, int]:
        """Remove the masked triplets for good: each layer keeps only its rank from ``rank_pattern``.

        The outputs do not change (masked triplets contribute 0 and the scale stays α/(init_r + 1e-5)). The
        parameters are replaced, so build the optimizer again if training continues.

        Returns:
            the kept rank per module.
        """
        adapter_name = self._adapter_or_default(adapter_name)
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            raise ConfigError(f"adapter {adapter_name!r} has no rank_pattern yet: nothing has been masked")
        self._truncate(adapter_name, pattern, strict=False)
        if adapter_name == self.trainable_adapter_name:
            self._start_allocator(adapter_name)
        self.set_adapter(self.active_adapters)
        return {name: layer.r[adapter_name] for name, layer in self._layers_with(adapter_name).items()}

    def _truncate(self, adapter_name: str, pattern: dict[str, list[bool]], strict: bool) -> None:
        for name, layer in self._layers_with(adapter_name).items():
            mask = pattern.get(f"{name}.lora_E")
            if mask is None:
                continue
            if len(mask) == layer.r[adapter_name]:
                truncate(layer, adapter_name, torch.tensor(mask, dtype=torch.bool, device="cpu"))
            elif strict or layer.r[adapter_name] != sum(mask):
                raise ConfigError(
                    f"rank_pattern[{name + '.lora_E'!r}] has {len(mask)} entries but the layer has rank "
                    f"{layer.r[adapter_name]}; the pattern belongs to another adapter"
                )

    def layer_file_state(self, name: str, layer: LoraLayer, adapter: str) -> dict[str, torch.Tensor]:
        """What a file holds for this layer: only the kept triplets once a rank pattern exists (PEFT's format)."""
        state = layer.adapter_state(adapter)
        pattern = self.peft_config[adapter].rank_pattern or {}
        mask = pattern.get(f"{name}.lora_E")
        if mask is None or len(mask) != layer.r.get(adapter) or all(mask):
            return state
        idx = torch.tensor([i for i, kept in enumerate(mask) if kept], dtype=torch.long)
        return {k: t.index_select(1 if k == "lora_B" else 0, idx.to(t.device)) for k, t in state.items()}

    def kept_ranks(self, adapter_name: str | None = None) -> dict[str, int]:
        """Rank per adapted module: from the rank pattern where one exists, else the layer's rank."""
        adapter_name = self._adapter_or_default(adapter_name)
        pattern = self.peft_config[adapter_name].rank_pattern or {}
        return {
            name: sum(pattern[f"{name}.lora_E"]) if f"{name}.lora_E" in pattern else layer.r[adapter_name]
            for name, layer in self._layers_with(adapter_name).items()
        }

    def lora_equivalent(self, adapter_name: str | None = None) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
        """The same update as a plain LoRA adapter: ``(LoraConfig, {module: {"lora_A.weight", "lora_B.weight"}})``.

        Per module, A' = (A ⊙ E) and B' = B · s_ada / s_lora over the kept triplets, with r = the kept rank
        (``rank_pattern`` where it differs from the most common one) and LoRA's s_lora = α / r; modules left
        with no triplet are not adapted at all.
        """
        adapter_name = self._adapter_or_default(adapter_name)
        config = self.peft_config[adapter_name]
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        ranks: dict[str, int] = {}
        for name, layer in self._layers_with(adapter_name).items():
            state = self.layer_file_state(name, layer, adapter_name)
            a, b, e = state["lora_A"], state["lora_B"], state["lora_E"]
            if a.shape[0] == 0:
                continue
            keep = (e.view(-1) != 0).nonzero().view(-1)  # masked-but-unsaved triplets carry λ = 0 too
            a, b, e = a[keep], b[:, keep], e[keep]
            r = int(keep.numel())
            if r == 0:
                continue
            ranks[name] = r
            s_lora = config.lora_alpha / r
            a_lora, b_lora = a * e, b * (layer.scaling[adapter_name] / s_lora)
            if layer.kind.name == "conv":  # LoRA's conv factors: A (r, in, kh, kw), B (out, r, 1, 1)
                kernel = layer.base_layer.weight.shape
                a_lora, b_lora = a_lora.reshape(r, *kernel[1:]), b_lora.reshape(*b_lora.shape, 1, 1)
            tensors[name] = {"lora_A.weight": a_lora.detach().clone(), "lora_B.weight": b_lora.detach().clone()}
        if not ranks:
            raise ConfigError(f"adapter {adapter_name!r} kept no triplet anywhere: its update is zero")
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        lora = LoraConfig(
            r=common,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=sorted(ranks),
            rank_pattern={name: r for name, r in ranks.items() if r != common},
            bias=config.bias,
            modules_to_save=config.modules_to_save,
            task_type=config.task_type,
            base_model_name_or_path=config.base_model_name_or_path,
            revision=config.revision,
        )
        return lora, tensors

    def after_save(self, adapter_name: str, config: LoraConfig, folder: str) -> None:
        """Beside a trained adapter (one with a ``rank_pattern``): the heatmap of its kept ranks (``RANKS_PLOT``)."""
        if config.rank_pattern:
            self.plot_ranks(os.path.join(folder, RANKS_PLOT), adapter_name)

    def plot_ranks(self, path: str, adapter_name: str | None = None) -> str:
        """A heatmap PNG of the kept rank per layer (rows) and module (columns); returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        adapter_name = self._adapter_or_default(adapter_name)
        config = self.peft_config[adapter_name]
        grid, rows, cols = rank_grid(self.kept_ranks(adapter_name))
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.28 * len(rows)))
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=config.init_r, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{int(grid[i][j])}", ha="center", va="center", fontsize=7, color="w")
        kept = [v for row in grid for v in row if not math.isnan(v)]
        ax.set_title(f"AdaLoRA ranks kept: {int(sum(kept))} of {config.init_r * len(kept)}")
        fig.colorbar(image, ax=ax, label="rank")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, buffer.getvalue())
        return path


def rank_grid(ranks: dict[str, int]) -> tuple[list[list[float]], list[str], list[str]]:
    """Module ranks as a grid: rows are layer indices (the first number in the name), columns the last name
    part (q_proj, ...). Cells with no adapted module are NaN."""
    rows: dict[str, None] = {}
    cols: dict[str, None] = {}
    cells = {}
    for name, r in ranks.items():
        parts = name.split(".")
        index = next((p for p in parts if p.isdigit()), "-")
        rows.setdefault(index, None)
        cols.setdefault(parts[-1], None)
        cells[(index, parts[-1])] = r
    row_names = sorted(rows, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0))
    col_names = list(cols)
    grid = [[float(cells.get((i, c), math.nan)) for c in col_names] for i in row_names]
    return grid, row_names, col_names


register_method(AdaLoraConfig, AdaLoraModel)
