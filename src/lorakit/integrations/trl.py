"""TRL's ``SFTTrainer`` and ``DPOTrainer`` with lorakit models, as TRL runs PEFT models.

TRL special-cases adapter models through ``isinstance(model, peft.PeftModel)``. Three of those places matter to a
lorakit model, and the classes here handle them (the rest are DeepSpeed/FSDP, QLoRA dtype and telemetry details):

- **The fused LM head.** TRL computes per-token log-probabilities without the full logits by patching
  ``forward`` of the *transformers* model (``trl.trainer.utils.add_fused_lm_head``: backbone, then the LM head in
  tiles); given an unknown wrapper it patches the wrapper, whose ``base_model`` is no backbone, and the first step
  fails. Here the wrapper's ``forward`` is left alone and the head goes on the transformers model inside the
  adapter (``model.get_base_model()``), as TRL does for PEFT. It computes every per-token field the kernel offers
  (a superset of what SFT and DPO read; each extra field costs a little, in the forward only).
- **DPO's reference model.** For a PEFT model TRL keeps no second model: the reference is the same model with the
  adapter switched off, or with a frozen copy of the adapter it starts from. Here the reference is an
  :class:`AdapterReference`, a view of the trained model that owns no parameters. As in TRL: with
  ``peft_config=`` (the trainer creates the adapter) the reference is the base model (adapters disabled); with a
  model that already holds an adapter, the reference is a frozen copy of that adapter named ``"ref"`` (a copy of
  the adapter's factors only; for a fresh LoRA adapter, B = 0, it computes exactly the base model). A ``"ref"``
  adapter the model already holds is used as it is. An explicit ``ref_model=`` is used as given.
- **``peft_config=``** accepts a lorakit config (``lorakit.LoraConfig(...)``...): the model is wrapped with
  :func:`lorakit.get_peft_model` before TRL sees it. A PEFT config goes to TRL unchanged (then it is PEFT's model).

Checkpoints, ``save_model``, resuming and ``load_best_model_at_end`` are :class:`AdapterTrainerMixin`'s. Refused,
with a :class:`~lorakit.errors.ConfigError`: an adapter on the LM head (TRL reads ``lm_head.weight`` directly, so it
would never train; TRL refuses it for PEFT), ``precompute_ref_log_probs`` and ``sync_ref_model`` with the shared
reference, and a model id (a string) with a lorakit config.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import trl
from torch import nn
from transformers import set_seed
from trl.trainer.utils import add_fused_lm_head

from lorakit.config import PeftConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.integrations.trainer import AdapterTrainerMixin
from lorakit.layers import AdapterLayer, ModulesToSaveWrapper
from lorakit.model import PeftModel
from lorakit.persistence import load_adapter_state, required_keys
from lorakit.tasks import get_peft_model

#: Every per-token field of TRL's fused head (trl.trainer.utils.add_fused_lm_head's ``outputs``).
FUSED_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
#: TRL's name for the frozen copy of a PEFT model's starting adapter (DPOTrainer).
REFERENCE_ADAPTER = "ref"


class AdapterReference(nn.Module):
    """DPO's reference model without a second copy of the base: the trained lorakit model, run with its adapters
    disabled (``adapter_name=None``) or with adapter ``adapter_name`` active instead of the trained one.

    It registers the model as no submodule, so it owns no parameters: moving, ``eval()`` or counting it leaves the
    trained model alone. Called (under ``torch.no_grad()`` by TRL), it switches, runs the model, switches back.

    Args:
        model: the lorakit model being trained.
        adapter_name: the frozen adapter that stands for the reference, or None for the base model.
    """

    def __init__(self, model: PeftModel, adapter_name: str | None = None) -> None:
        super().__init__()
        self.__dict__["policy"] = model  # a plain attribute, not a submodule
        self.adapter_name = adapter_name
        if adapter_name is not None:
            model._check_adapter(adapter_name)

    @property
    def config(self) -> Any:
        return self.policy.config

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the trained model computes the reference."""
        if self.adapter_name is None:
            with self.policy.disable_adapter():
                yield
            return
        tuner = self.policy.base_model
        trained = list(tuner.active_adapters)
        tuner.set_adapter([self.adapter_name])
        try:
            yield
        finally:
            tuner.set_adapter(trained)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.active():
            return self.policy(*args, **kwargs)

    def extra_repr(self) -> str:
        what = "adapters disabled" if self.adapter_name is None else f"adapter {self.adapter_name!r}"
        return f"{type(self.policy).__name__} with {what}"


def frozen_copy(model: PeftModel, name: str = REFERENCE_ADAPTER) -> str | None:
    """Add adapter ``name``, a frozen (inference-mode) copy of the active adapter's weights; returns ``name``.

    Returns None, with a warning, where the method cannot hold a second adapter of this config (the model is then
    left as it was), so the reference falls back to the base model, as TRL does where PEFT cannot.
    """
    source = model.active_adapter
    config = copy.deepcopy(model.peft_config[source])
    config.inference_mode = True
    if getattr(config, "bias", "none") != "none":
        config.bias = "none"  # biases are the base model's own tensors: one adapter trains them, none copies them
    added = False
    try:
        model.add_adapter(name, config)
        added = True
        state = {k: t.detach().clone() for k, t in required_keys(model.base_model, source).items()}
        load_adapter_state(model.base_model, name, state)
    except LorakitError as exc:
        if added:
            model.delete_adapter(name)
        warnings.warn(
            f"could not add a frozen copy {name!r} of adapter {source!r} as DPO's reference ({exc}); the reference is "
            "the base model (adapters disabled), which equals the adapter only while it is freshly initialized",
            stacklevel=3,
        )
        return None
    return name


def _refuse_adapted_head(model: PeftModel) -> None:
    head = model.get_base_model().get_output_embeddings()
    if isinstance(head, AdapterLayer) and not isinstance(head, ModulesToSaveWrapper):
        raise ConfigError(
            "the LM head (get_output_embeddings()) holds an adapter, which TRL would never train: it computes the "
            "log-probabilities from lm_head.weight directly. Remove 'lm_head' from target_modules (to train the head "
            "in full, put it in modules_to_save)"
        )


class _TRLAdapterMixin(AdapterTrainerMixin):
    """What SFT and DPO share: a lorakit config wraps the model, and the fused head goes inside the adapter."""

    _trl_class: type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(self._trl_class.__init__).bind(self, *args, **kwargs)
        model, created = _lorakit_model_of(bound.arguments)
        forward_before = None
        if model is not None:
            _refuse_adapted_head(model)
            self._before_init(bound.arguments, model, created)
            forward_before = vars(model).get("forward")
        super().__init__(*bound.args[1:], **bound.kwargs)
        if model is not None:
            _fused_head_inside(model, forward_before)

    def _before_init(self, arguments: dict[str, Any], model: PeftModel, created: bool) -> None:
        """Called with TRL's arguments once the lorakit model is known (``created``: made from ``peft_config``)."""


def _lorakit_model_of(arguments: dict[str, Any]) -> tuple[PeftModel | None, bool]:
    """The lorakit model TRL will train (wrapping ``model`` when ``peft_config`` is lorakit's), and whether it was
    created here."""
    model, config = arguments.get("model"), arguments.get("peft_config")
    if isinstance(config, PeftConfig):
        if not isinstance(model, nn.Module) or isinstance(model, PeftModel):
            what = repr(model) if isinstance(model, str) else f"a {type(model).__name__}"
            raise ConfigError(
                f"peft_config is a lorakit config and model is {what}; give the base model as a loaded "
                "transformers model (e.g. AutoModelForCausalLM.from_pretrained(...)), which lorakit wraps"
            )
        set_seed(getattr(arguments.get("args"), "seed", 42))  # the adapter's random init, reproducibly (as TRL)
        arguments["model"] = get_peft_model(model, config)
        arguments.pop("peft_config")
        return arguments["model"], True
    if isinstance(model, PeftModel):
        if config is not None:
            raise ConfigError(
                "model is already a lorakit model and peft_config is given too; pass peft_config=None to train its "
                "adapter, or pass the base model with the config"
            )
        return model, False
    return None, False


def _fused_head_inside(model: PeftModel, forward_before: Any) -> None:
    """Undo TRL's patch of the wrapper's ``forward`` and patch the transformers model inside it instead."""
    if vars(model).get("forward") is forward_before:
        return  # TRL left the wrapper alone
    if forward_before is None:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = forward_before
    add_fused_lm_head(model.get_base_model(), outputs=FUSED_OUTPUTS)


class SFTTrainer(_TRLAdapterMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for lorakit models (``model=`` a lorakit model, or ``peft_config=`` a lorakit config)."""

    _trl_class = trl.SFTTrainer


class DPOTrainer(_TRLAdapterMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` for lorakit models; without ``ref_model`` the reference is the trained model itself
    (:class:`AdapterReference`), so the base model is held once."""

    _trl_class = trl.DPOTrainer

    def _before_init(self, arguments: dict[str, Any], model: PeftModel, created: bool) -> None:
        if arguments.get("ref_model") is not None:
            return  # the user's reference model, used as given
        args = arguments.get("args")
        for flag in ("precompute_ref_log_probs", "sync_ref_model"):
            if getattr(args, flag, False):
                raise ConfigError(
                    f"{flag}=True needs a reference model of its own, and this one is the trained lorakit model with "
                    f"its adapter switched (no second copy of the base); set {flag}=False, or pass ref_model="
                )
        if REFERENCE_ADAPTER in model.active_adapters:
            raise ConfigError(
                f"the trained adapter is named {REFERENCE_ADAPTER!r}, the name DPOTrainer gives the reference; load or "
                "add it under another name"
            )
        if created:
            adapter = None
        elif REFERENCE_ADAPTER in model.peft_config:
            adapter = REFERENCE_ADAPTER
        else:
            adapter = frozen_copy(model)
        arguments["ref_model"] = AdapterReference(model, adapter)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.ref_model, AdapterReference):
            # TRL patched its fused head onto the reference too; the model it runs already computes through one
            self.ref_model.__dict__.pop("forward", None)
