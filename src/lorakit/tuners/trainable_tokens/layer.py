"""Trainable token rows: an adapter trains chosen rows of an embedding (e.g. newly added special tokens) and no
others (PEFT's TrainableTokens method; LoRA's ``trainable_token_indices`` uses the same rows).

Each adapter holds the *values* of its rows, ``trainable_tokens_delta[adapter]: (n, dim)`` (PEFT's name, though
they are not differences), started from the base rows. Storing values rather than differences keeps the result
defined when the rows of a resized vocabulary were drawn at random: loading writes the trained rows whatever the
base held there. The base weight is never touched until :meth:`~_TokenLayer.merge`, which writes the rows into it
(``trainable_tokens_original``, the base rows when the adapter was added, restores them on unmerge).

Two layers share this state:

* :class:`TrainableTokensLayer` (the standalone method, PEFT's layout ``<emb>.trainable_tokens_delta``);
* :class:`TrainableTokensWrapper` (LoRA's ``trainable_token_indices``, PEFT's layout
  ``<emb>.token_adapter.trainable_tokens_delta``), an auxiliary module like a ``modules_to_save`` copy.

A layer *tied* to another (the output head of a model whose head shares the input embedding's weight) holds no rows
of its own: it reads the embedding's, so the head's logits of those tokens use the trained rows too (the head's
``(vocab, dim)`` weight has one row per token, as the embedding's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import AdapterNotFoundError, ConfigError, MergeError, suggest
from lorakit.layers.base import WeightLayer
from lorakit.layers.kinds import EmbeddingKind, LayerKind, LinearKind, kind_for
from lorakit.layers.routing import BASE_ROW, current_routes


def token_kind(module: nn.Module, where: str) -> LayerKind:
    """The kind of a module whose rows can train: an ``nn.Embedding``, or an unquantized ``nn.Linear`` output head.

    Raises:
        ConfigError: any other module, naming it.
    """
    kind = kind_for(module)
    if kind is None or kind.quantized or type(kind) not in (EmbeddingKind, LinearKind):
        raise ConfigError(
            f"trainable token rows need an embedding (torch.nn.Embedding) or an output head (torch.nn.Linear) whose "
            f"weight has one row per token; {where!r} is a {type(module).__module__}.{type(module).__name__}"
        )
    return kind


class _Rows(nn.Module):
    """Adapter name -> a non-persistent buffer (PEFT's ``BufferDict``): the base rows, not saved."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]


class TokenRows(nn.Module):
    """The rows a layer trains, per adapter (the state PEFT's ``TrainableTokensLayer`` holds).

    Attributes:
        base_layer: the frozen ``nn.Embedding`` (rows are tokens) or ``nn.Linear`` head (rows are output features,
            one per token).
        trainable_tokens_delta: adapter -> ``Parameter (n, dim)``, the rows' trained values.
        trainable_tokens_original: adapter -> ``(n, dim)`` buffer, the base rows when the adapter was added.
        token_indices: adapter -> the ``n`` token ids, in the order of the rows.
        tied_to: the rows this one reads (a tied output head), or None. Not a submodule (it is saved once).
    """

    def __init__(self, base_layer: nn.Module, tied_to: TokenRows | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list keeps it out of named_modules()
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Rows()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same containers (PEFT's layout: they appear under both modules' names)
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.trainable_tokens_original = tied_to.trainable_tokens_original
            self.token_indices = tied_to.token_indices
        # index tensors per (adapter, device), and a count of adapter changes: shared with the tied layers
        self._shared: dict[str, Any] = tied_to._shared if tied_to is not None else {"version": 0, "index": {}}

    @property
    def tied_to(self) -> TokenRows | None:
        return self._tied[0] if self._tied else None

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_rows(self, adapter: str, indices: list[int], init_weights: bool, dtype: torch.dtype, where: str) -> None:
        """Give ``adapter`` the rows ``indices``, started from the base rows (or random with ``init_weights=False``).

        Raises:
            ConfigError: an index outside the vocabulary, or repeated; naming the index and the vocabulary size.
        """
        weight = self.base_weight()
        vocab = weight.shape[0]
        bad = [i for i in indices if not 0 <= i < vocab]
        if bad:
            raise ConfigError(
                f"trainable token index {bad[0]} is out of range for {where!r}, whose vocabulary has {vocab} tokens "
                f"(ids 0..{vocab - 1}); call model.resize_token_embeddings(...) before adding the adapter when the "
                "tokens are new"
            )
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise ConfigError(f"trainable token ids {repeated} are listed more than once for {where!r}; list each once")
        index = torch.tensor(indices, dtype=torch.long, device=weight.device)
        originals = weight.detach().index_select(0, index).clone()
        values = originals if init_weights else torch.randn_like(originals)
        self.token_indices[adapter] = list(indices)
        self.trainable_tokens_delta[adapter] = nn.Parameter(values.to(dtype).clone())
        self.trainable_tokens_original[adapter] = originals
        self._changed()

    def delete_rows(self, adapter: str) -> None:
        del self.trainable_tokens_delta[adapter]
        del self.trainable_tokens_original[adapter]
        del self.token_indices[adapter]
        self._changed()

    def _changed(self) -> None:
        self._shared["index"].clear()
        self._shared["version"] += 1

    @property
    def version(self) -> int:
        """Counts the adapters added and removed here or on a tied layer (layers cache their active list on it)."""
        return self._shared["version"]

    def index(self, adapter: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, sorted ids, row of each sorted id)`` on ``device``, kept until the adapters change."""
        cache = self._shared["index"]
        cached = cache.get((adapter, device))
        if cached is None:
            index = torch.tensor(self.token_indices[adapter], dtype=torch.long, device=device)
            ids, order = torch.sort(index)
            cached = cache[(adapter, device)] = (index, ids, order)
        return cached

    def check_disjoint(self, adapters: list[str]) -> None:
        """Refuse adapters whose rows overlap: which value a shared token gets would depend on their order (PEFT
        refuses them too)."""
        seen: dict[int, str] = {}
        for adapter in dict.fromkeys(adapters):
            for i in self.token_indices[adapter]:
                if i in seen:
                    raise ConfigError(
                        f"adapters {seen[i]!r} and {adapter!r} both train token {i}; adapters whose token rows "
                        "overlap cannot be active or merged together: activate or merge one of them at a time"
                    )
                seen[i] = adapter

    def weight_with(self, adapters: list[str]) -> torch.Tensor:
        """The base weight with the adapters' rows written in, out of place (gradients reach the rows)."""
        weight = self.base_weight()
        for adapter in adapters:
            index = self.index(adapter, weight.device)[0]
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[adapter].to(weight.dtype))
        return weight

    def rows_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output with the adapters' rows in place of the base rows.

        Embedding: the positions holding one of the tokens take the trained row (times the layer's ``embed_scale``,
        Gemma's scaled embeddings); the others keep the base lookup. Output head: the logits of those tokens are
        ``x · rowᵀ (+ bias)``. Either way only the chosen rows get gradients.
        """
        out = self.base_layer(x, *args, **kwargs)
        embedding = isinstance(self.base_layer, nn.Embedding)
        for adapter in adapters:
            delta = self.trainable_tokens_delta[adapter]
            index, ids, order = self.index(adapter, out.device)
            if embedding:
                ids = ids.to(x.dtype)
                slot = torch.searchsorted(ids, x).clamp_(max=ids.numel() - 1)
                hit = ids[slot] == x
                rows = F.embedding(order[slot], delta.to(out.dtype))
                scale = getattr(self.base_layer, "embed_scale", None)
                if scale is not None:
                    rows = rows * torch.as_tensor(scale, device=rows.device, dtype=rows.dtype)
                out = torch.where(hit.unsqueeze(-1), rows, out)
            else:
                columns = F.linear(x.to(out.dtype), delta.to(out.dtype))
                bias = getattr(self.base_layer, "bias", None)
                if bias is not None:
                    columns = columns + bias.index_select(0, index).to(out.dtype)
                out = out.index_copy(out.dim() - 1, index, columns)
        return out

    @torch.no_grad()
    def write_rows(self, adapter: str, weight: torch.Tensor, originals: bool = False) -> None:
        """Write the adapter's trained rows (or, with ``originals``, the base rows) into ``weight``, in place."""
        source = (self.trainable_tokens_original if originals else self.trainable_tokens_delta)[adapter]
        weight.index_copy_(0, self.index(adapter, weight.device)[0], source.to(weight.dtype))


class _TokenLayer(WeightLayer):
    """What both token layers do as adapter layers (switching, merging, saving), over :attr:`rows`."""

    #: The file key of an adapter's rows, relative to the layer (PEFT's).
    FILE_KEY = "trainable_tokens_delta"
    #: Whether a tied layer's file state repeats the rows (the standalone method's files do, LoRA's do not).
    SAVES_TIED = False

    rows: TokenRows
    merged_adapters: list[str]
    disable_adapters: bool

    def _init_state(self, base_layer: nn.Module, where: str) -> None:
        self.kind = token_kind(base_layer, where)
        self.merged_adapters = []
        self.disable_adapters = False

    def add(self, adapter: str, indices: list[int], init_weights: bool, dtype: torch.dtype, where: str) -> None:
        if self.rows.tied_to is not None:
            raise ConfigError(
                f"{where!r} reads its token rows from the input embedding (tied weights); give trainable token ids "
                "for the input embedding instead"
            )
        self.rows.add_rows(adapter, indices, init_weights, dtype, where)

    @property
    def tied(self) -> bool:
        return self.rows.tied_to is not None

    # the active-adapter cache (AdapterLayer) keys on this: a tied layer's adapters change with the embedding's
    @property
    def adapters_stamp(self) -> int:
        rows = self.__dict__.get("_modules", {}).get("token_adapter", self)
        return self.__dict__.get("_stamp", 0) + (rows._shared["version"] if "_shared" in rows.__dict__ else 0)

    @adapters_stamp.setter
    def adapters_stamp(self, value: int) -> None:
        self.__dict__["_stamp"] = self.__dict__.get("_stamp", 0) + value - self.adapters_stamp

    def adapter_names(self) -> list[str]:
        return list(self.rows.token_indices)

    def _check(self, adapter: str) -> None:
        if adapter not in self.rows.token_indices:
            raise AdapterNotFoundError(
                f"adapter {adapter!r} has no token rows on this layer; it holds {self.adapter_names()}"
                + suggest(adapter, self.rows.token_indices)
            )

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        self._check(adapter)
        if self.tied and not self.SAVES_TIED:
            return {}  # the rows are the input embedding's, saved there
        return {self.FILE_KEY: self.rows.trainable_tokens_delta[adapter]}

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        return f"{file_key}.{adapter}"

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        self._check(adapter)
        return [] if self.tied else [self.rows.trainable_tokens_delta[adapter]]

    def delete(self, adapter: str) -> None:
        self._check(adapter)
        if adapter in self.merged_adapters:
            raise MergeError(f"adapter {adapter!r} is merged into the base weight; unmerge it before deleting it")
        self.rows.delete_rows(adapter)  # a tied layer's rows are the embedding's: they go for both, in either order
        self._forget(adapter)

    def original(self) -> nn.Module:
        return self.rows.base_layer

    def token_indices_of(self, adapter: str) -> list[int]:
        return list(self.rows.token_indices[adapter])

    # -- merging --------------------------------------------------------------------------------------

    def _shares_weight(self) -> bool:
        """Whether this (tied) layer's base weight is the tied embedding's: merging there merges here too."""
        source = self.rows.tied_to
        return source is not None and self.rows.base_weight() is source.base_weight()

    def merged_result(self, adapter_names: list[str]) -> torch.Tensor:
        self.rows.check_disjoint([*self.merged_adapters, *adapter_names])
        weight = self.rows.weight_with(adapter_names)
        for adapter in adapter_names:
            if not torch.isfinite(self.rows.trainable_tokens_delta[adapter]).all():
                raise MergeError(f"adapter {adapter!r}'s token rows hold NaN or Inf; merging would write them")
        return weight

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write each adapter's rows (default: the active adapters') into the base weight, in place."""
        pending = self._pending(adapter_names)
        self._refuse_quantized(pending)
        if not pending:
            return
        if safe_merge:
            self.merged_result(pending)
        self.rows.check_disjoint([*self.merged_adapters, *pending])
        for adapter in pending:
            if not self._shares_weight():
                self.rows.write_rows(adapter, self.rows.base_weight())
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base rows back, newest merge first."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if not self._shares_weight():
                self.rows.write_rows(adapter, self.rows.base_weight(), originals=True)

    # -- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.rows.base_layer(x, *args, **kwargs)
        routes = current_routes()
        routing = routes.get(self) if routes is not None else None
        if routing is not None:
            return self._routed_forward(x, routing.rows(x.shape[0]), *args, **kwargs)
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if not pending:
            return self.rows.base_layer(x, *args, **kwargs)
        if len(pending) > 1 or self.merged_adapters:
            self.rows.check_disjoint([*self.merged_adapters, *pending])
        return self.rows.rows_forward(x, pending, *args, **kwargs)

    def _routed_forward(self, x: torch.Tensor, names: tuple[str, ...], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of the batch through adapter ``names[i]`` (``"__base__"``, or one without rows here: none)."""
        out = self.rows.base_layer(x, *args, **kwargs)
        held = set(self.adapter_names())
        for adapter in dict.fromkeys(names):
            if adapter == BASE_ROW or adapter not in held:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == adapter], device=x.device)
            part = self.rows.rows_forward(x.index_select(0, rows), [adapter], *args, **kwargs)
            out = out.index_copy(0, rows, part.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        held = ", ".join(f"{a}: {len(ids)} tokens" for a, ids in self.rows.token_indices.items())
        return f"adapters=({held}), tied={self.tied}, merged={self.merged_adapters}"


class TrainableTokensLayer(TokenRows, _TokenLayer):
    """The standalone method's layer (PEFT's ``TrainableTokensLayer``): it replaces the embedding, holding the
    rows itself (file keys ``<emb>.trainable_tokens_delta``, the base at ``<emb>.base_layer``)."""

    SAVES_TIED = True  # PEFT's standalone files repeat the rows under the tied head's name

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None, where: str = "") -> None:
        super().__init__(base_layer, tied_to)
        self._init_state(base_layer, where)

    @property
    def rows(self) -> TokenRows:
        return self


class TrainableTokensWrapper(_TokenLayer):
    """LoRA's ``trainable_token_indices`` module (PEFT's ``TrainableTokensWrapper``): the embedding (or a tied output
    head) wrapped with its rows in ``token_adapter`` (file keys ``<emb>.token_adapter.trainable_tokens_delta``).

    Reading ``weight`` gives the weight the active adapters' rows make (PEFT's); other attributes are the wrapped
    module's (``num_embeddings``, ``padding_idx``, ...).
    """

    FILE_KEY = "token_adapter.trainable_tokens_delta"

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensWrapper | None = None, where: str = "") -> None:
        super().__init__()
        self.token_adapter = TokenRows(base_layer, tied_to.token_adapter if tied_to is not None else None)
        self._init_state(base_layer, where)

    @property
    def rows(self) -> TokenRows:
        return self.token_adapter

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        pending = [a for a in self.active_adapters if a not in self.merged_adapters]
        if self.disable_adapters or not pending:
            return self.token_adapter.base_layer.weight
        return self.token_adapter.weight_with(pending)

    def adapter_param_key(self, adapter: str, file_key: str) -> str:
        return f"{file_key}.{adapter}"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("_") or "token_adapter" not in modules:
                raise
            return getattr(modules["token_adapter"].base_layer, name)
