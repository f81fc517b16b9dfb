"""The trainable-tokens method's tuner (PEFT's ``TrainableTokensModel``): the input embedding (or the modules
``target_modules`` names) becomes a :class:`~lorakit.tuners.trainable_tokens.layer.TrainableTokensLayer`; an output
head sharing its weight reads the same rows. Everything else is the shared engine,
:class:`~lorakit.tuners.base.BaseTuner`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.config import register_method
from lorakit.errors import TargetNotFoundError, suggest
from lorakit.targeting import matches_selector
from lorakit.tuners.base import BaseTuner
from lorakit.tuners.modules_to_save import inside_adapter_layer
from lorakit.tuners.trainable_tokens.auxiliary import tie_head
from lorakit.tuners.trainable_tokens.config import TrainableTokensConfig
from lorakit.tuners.trainable_tokens.layer import TrainableTokensLayer
from lorakit.tuners.tying import input_embedding_name, tied_embedding_names


class TrainableTokensModel(BaseTuner):
    """A model whose chosen embedding rows train (see :class:`TrainableTokensConfig`)."""

    prefix = "trainable_tokens_"
    config_class = TrainableTokensConfig
    layer_type = TrainableTokensLayer
    #: "auto" saves the rows only, never the whole embedding (read by :mod:`lorakit.persistence`, as PEFT decides)
    trains_token_rows = True

    def _targets(self, config: TrainableTokensConfig) -> list[str]:
        """The modules ``target_modules`` names (default: the input embedding). A head tied to a targeted input
        embedding is left out: it reads the embedding's rows (:meth:`_after_inject`)."""
        selector = config.target_modules if config.target_modules is not None else input_embedding_name(self.model)
        names = [
            name
            for name, _ in self.model.named_modules()
            if name and matches_selector(name, selector) and not inside_adapter_layer(self.model, name)
        ]
        if not names:
            leaves = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules() if n}
            raise TargetNotFoundError(
                f"target_modules={selector!r} matched no module of {type(self.model).__name__}; name the embedding "
                "layer, e.g. 'embed_tokens'" + (suggest(selector, leaves) if isinstance(selector, str) else "")
            )
        if input_embedding_name(self.model) in names:
            tied = set(tied_embedding_names(self.model))
            names = [n for n in names if n not in tied]
        return names

    def _create_and_replace(
        self, plan: tuple[str, nn.Module, Any], adapter_name: str, config: TrainableTokensConfig
    ) -> None:
        name, module, _ = plan
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module, where=name)
        layer.add(adapter_name, config.token_indices, config.init_weights, self._adapter_dtype(layer), name)
        if layer is not module:
            self._replace(name, layer)

    def _after_inject(self, adapter_name: str, config: TrainableTokensConfig) -> None:
        """A head sharing the input embedding's weight reads its rows (PEFT ties it whenever the config says
        ``tie_word_embeddings``)."""
        source = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if isinstance(source, TrainableTokensLayer) and adapter_name in source.adapter_names():
            for name in tied_embedding_names(self.model):
                tie_head(self.model, self._active, name, source, TrainableTokensLayer)

    def file_config(self, adapter_name: str, config: TrainableTokensConfig) -> TrainableTokensConfig:
        """PEFT writes the input embedding's name when ``target_modules`` was left None; so does lorakit."""
        if config.target_modules is None:
            config.target_modules = input_embedding_name(self.model)
        return config


register_method(TrainableTokensConfig, TrainableTokensModel)
