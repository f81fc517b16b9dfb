"""LoRA on ``nn.MultiheadAttention`` (PEFT 0.21's ``lora.MultiheadAttention``): the packed in-projection and out_proj.

``nn.MultiheadAttention`` holds its query/key/value projection as one parameter, ``in_proj_weight`` ``(3E, E)``,
and reads ``out_proj.weight`` ``(E, E)`` directly (``out_proj``'s forward is never called), so no ``nn.Linear``
forward exists to add ``B A x`` to. As in PEFT, one adapter on the module adapts both weights with their own
factors at the same rank and scale s::

    in_proj_weight' = in_proj_weight + s·B_in A_in        A_in (r, E),  B_in (3E, r)
    out_proj.weight' = out_proj.weight + c·s·B_out A_out   A_out (r, E), B_out (E, r)

and the attention runs on the updated weights. **c = 2** (:data:`PEFT_OUT_PROJ_FACTOR`) reproduces PEFT 0.21.2,
whose ``MultiheadAttention.merge`` writes ``W + ΔW`` into out_proj and then calls out_proj's own ``merge``, which
adds ΔW again (in forward, which merges before every call, and in ``merge_and_unload``; ``unmerge`` subtracts
twice). An adapter trained with PEFT 0.21 learnt under that factor, so lorakit applies it too: the same file
gives the same model in both libraries. The upstream fix (huggingface/peft PR #3774, open) makes it 1; set the
constant to 1.0 to follow a fixed PEFT (files then mean something else to PEFT 0.21).

PEFT merges the updates into the module before every forward and unmerges after; lorakit never touches the
module in forward: it runs the module's own ``forward`` on a view of it that holds the updated tensors in place
of its parameters (:class:`_UpdatedAttention`), so gradients reach the factors, the base stays as it was, and
threads that run the layer at once never see each other's weights. A module with forward hooks is called
itself instead, its parameters swapped for the call (``torch.func.functional_call``), so the hooks see it.
Merging writes ΔW into both weights for good.

Like PEFT: the query, key and value must share the embedding size (``_qkv_same_embed_dim``); plain LoRA only (no
DoRA, no ``lora_bias``: PEFT adds a bias to B_in that never reaches the output); the adapter's dropout is not
applied (the update enters as a weight, there is no input of its own to drop); batches that mix adapters are
refused. Files hold PEFT's keys: ``<mha>.lora_A.weight``, ``<mha>.lora_B.weight`` (in-projection) and
``<mha>.base_layer.out_proj.lora_A.weight``, ``….lora_B.weight``. In memory, the out-projection's factors live
in the layer's ``lora_out_proj`` (the base module is not modified).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.errors import UnsupportedModuleError
from lorakit.layers.kinds import LayerKind
from lorakit.layers.routing import current_routes
from lorakit.tuners.lora.delta import lora_delta
from lorakit.tuners.lora.kinds import LinearOps, _global_hooks_set
from lorakit.tuners.lora.layer import LoraLayer
from lorakit.tuners.lora.variant import check_finite

#: The out-projection's factors in files, relative to the module (PEFT wraps ``out_proj`` inside ``base_layer``).
OUT_PREFIX = "base_layer.out_proj."
#: c in ΔW_out = c·s·B_out A_out: PEFT 0.21.2 adds the out-projection's update twice (see the module docstring).
PEFT_OUT_PROJ_FACTOR = 2.0


class MultiheadAttentionKind(LinearOps, LayerKind):
    """The in-projection's geometry (W ``(3E, E)``, bias ``in_proj_bias``) with LoRA's linear factors."""

    name = "mha"
    has_fused_forward = False
    supports_lora_bias = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def features(self, base: nn.Module) -> tuple[int, int]:
        if not base._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                f"LoRA on nn.MultiheadAttention needs query, key and value of one size (kdim = vdim = embed_dim = "
                f"{base.embed_dim}), as in PEFT; got kdim={base.kdim}, vdim={base.vdim}"
            )
        return base.embed_dim, 3 * base.embed_dim

    def base_weight(self, base: nn.Module) -> torch.Tensor:
        return base.in_proj_weight

    def bias(self, base: nn.Module) -> torch.Tensor | None:
        return base.in_proj_bias

    def check_adapter(self, layer: LoraLayer, r: int, variant: str, init: bool | str, lora_bias: bool) -> None:
        """Plain LoRA with a plain start (True, False, "gaussian") and no ``lora_bias``, as PEFT supports."""
        plain_init = any(init is v for v in (True, False)) or init == "gaussian"
        if lora_bias or variant != "lora" or not plain_init:
            raise UnsupportedModuleError(
                f"nn.MultiheadAttention takes plain LoRA adapters (use_dora=False, lora_bias=False, init_lora_weights "
                f"True, False or 'gaussian'), as in PEFT; got variant {variant!r}, lora_bias={lora_bias}, "
                f"init_lora_weights={init!r}. Narrow target_modules to skip it"
            )

    def refuse_merge(self, layer: LoraLayer, pending: list[str]) -> None:
        return None  # both weights take their ΔW; nothing else to fold in


MHA_KIND = MultiheadAttentionKind()


class LoraMultiheadAttention(LoraLayer):
    """A LoRA layer around ``nn.MultiheadAttention``: the in-projection's factors are the layer's own (``lora_A``,
    ``lora_B``), the out-projection's are in ``lora_out_proj``; ``r``, ``scaling`` and the active adapters are
    shared by both (one PEFT adapter)."""

    def __init__(self, base_layer: nn.Module, kind: LayerKind = MHA_KIND) -> None:
        super().__init__(base_layer, kind)
        self.lora_out_proj = nn.Module()
        self.lora_out_proj.lora_A = nn.ModuleDict()
        self.lora_out_proj.lora_B = nn.ModuleDict()

    def add(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """:meth:`LoraLayer.add` for the in-projection, then the out-projection's A ``(r, E)`` and B ``(E, r)``,
        started the same way (A Kaiming-uniform or N(0, 1/r), B = 0; ``False``: torch's default draws)."""
        super().add(adapter, r, lora_alpha, lora_dropout, init_lora_weights, *args, **kwargs)
        init = init_lora_weights
        a_in = self.lora_A[adapter].weight
        embed = self.base_layer.embed_dim
        a = nn.Linear(embed, r, bias=False).to(device=a_in.device, dtype=a_in.dtype)
        b = nn.Linear(r, embed, bias=False).to(device=a_in.device, dtype=a_in.dtype)
        if init is not False:
            if init == "gaussian":
                nn.init.normal_(a.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.lora_out_proj.lora_A[adapter] = a
        self.lora_out_proj.lora_B[adapter] = b

    def out_factors(self, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(A_out (r, E), B_out (E, r))``."""
        return self.lora_out_proj.lora_A[adapter].weight, self.lora_out_proj.lora_B[adapter].weight

    def out_delta(self, adapter: str) -> torch.Tensor:
        """ΔW_out = c·s·B_out A_out ``(E, E)``, c = :data:`PEFT_OUT_PROJ_FACTOR` (PEFT 0.21.2's factor)."""
        a, b = self.out_factors(adapter)
        return lora_delta(b, a, self.scaling[adapter]) * PEFT_OUT_PROJ_FACTOR

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        out = super().adapter_state(adapter)
        a, b = self.out_factors(adapter)
        out[f"{OUT_PREFIX}lora_A.weight"], out[f"{OUT_PREFIX}lora_B.weight"] = a, b
        return out

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return [*super().adapter_parameters(adapter), *self.out_factors(adapter)]

    def delete(self, adapter: str) -> None:
        super().delete(adapter)
        del self.lora_out_proj.lora_A[adapter], self.lora_out_proj.lora_B[adapter]

    # -- merging: the in-projection through LoraLayer, the out-projection beside it ------------------------

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        pending = self._pending(adapter_names)
        weight = self.base_layer.out_proj.weight
        if safe_merge:
            self._merged_out(pending)
        super().merge(adapter_names, safe_merge)
        for adapter in pending:
            weight.add_(self.out_delta(adapter).to(weight.dtype))

    def merged_result(self, adapter_names: list[str]) -> Any:
        self._merged_out(adapter_names)
        return super().merged_result(adapter_names)

    @torch.no_grad()
    def _merged_out(self, adapter_names: list[str]) -> torch.Tensor:
        """``out_proj.weight`` with ``adapter_names`` added, out of place; :class:`MergeError` on NaN/Inf."""
        weight = self.base_layer.out_proj.weight
        for adapter in self._pending(adapter_names):
            weight = weight + self.out_delta(adapter).to(weight.dtype)
            check_finite(weight, adapter)
        return weight

    @torch.no_grad()
    def unmerge(self) -> None:
        merged = list(self.merged_adapters)
        super().unmerge()
        weight = self.base_layer.out_proj.weight
        for adapter in reversed(merged):
            weight.sub_(self.out_delta(adapter).to(weight.dtype))

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The attention of the base module on ``W + Σ s·B A`` for both weights (the active, unmerged adapters).

        Raises:
            UnsupportedModuleError: inside a batch that mixes adapters (``adapter_names``), as in PEFT.
        """
        if self.disable_adapters:
            return self.base_layer(query, *args, **kwargs)
        routes = current_routes()
        if routes is not None and routes.get(self) is not None:
            raise UnsupportedModuleError(
                "batches that mix adapters (adapter_names) do not run through nn.MultiheadAttention (PEFT refuses "
                "them too): give the batch a single adapter (set_adapter) instead"
            )
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not pending:
            return self.base_layer(query, *args, **kwargs)
        base = self.base_layer
        w_in, w_out = base.in_proj_weight, base.out_proj.weight
        for adapter in pending:
            w_in = w_in + self.delta_weight(adapter).to(w_in.dtype)
            w_out = w_out + self.out_delta(adapter).to(w_out.dtype)
        if base._forward_hooks or base._forward_pre_hooks or _global_hooks_set():  # hooks see the module itself
            params = {"in_proj_weight": w_in, "out_proj.weight": w_out}
            return torch.func.functional_call(base, params, (query, *args), kwargs)
        return type(base).forward(_UpdatedAttention(base, w_in, w_out), query, *args, **kwargs)


class _UpdatedAttention:
    """What ``nn.MultiheadAttention.forward`` reads of its module (``self.<attribute>``), with ``in_proj_weight``
    and ``out_proj.weight`` replaced: the module itself is never changed."""

    def __init__(self, base: nn.Module, in_proj_weight: torch.Tensor, out_weight: torch.Tensor) -> None:
        self._base = base
        self.in_proj_weight = in_proj_weight
        self.out_proj = _UpdatedOut(base.out_proj, out_weight)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


class _UpdatedOut:
    """``out_proj`` with its weight replaced (its bias and everything else read from it)."""

    def __init__(self, base: nn.Module, weight: torch.Tensor) -> None:
        self._base = base
        self.weight = weight

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


MultiheadAttentionKind.layer_class = LoraMultiheadAttention  # what LoraModel wraps such a module in
