"""A wrapper's ``forward`` that reports the signature of the model it wraps.

A lorakit model's ``forward`` hands its arguments to the base model, so the signature that tells the truth about
what it accepts is the base model's, plus ``adapter_names``. Tools read it: the HF Trainer keeps only the dataset
columns that ``inspect.signature(model.forward)`` names (it would drop every column of a ``forward(*args,
**kwargs)``), and reads a ``**kwargs`` in it as "accepts ``num_items_in_batch``". The base model is only known per
instance, so ``forward`` is a descriptor whose bound form computes that signature when asked.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

#: The argument every lorakit ``forward`` adds to the base model's (one adapter per row, eval mode).
OWN_PARAMETER = "adapter_names"


class reports_base_signature:  # a decorator, named like one
    """Decorator for a wrapper's ``forward``: ``inspect.signature(model.forward)`` is the base model's forward
    signature (``model.get_base_model().forward``) with ``adapter_names`` added as a keyword-only argument.

    Calls are unchanged: ``model.forward(...)`` runs the decorated function with ``self`` bound. On the class,
    ``Cls.forward`` is the plain function (as for any method).
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        self.__func__ = func
        functools.update_wrapper(self, func)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.__func__
        if torch.compiler.is_compiling():  # dynamo cannot trace the partial subclass; nothing reads a signature there
            return functools.partial(self.__func__, obj)
        return _BoundForward(self.__func__, obj)


class _BoundForward(functools.partial):
    """``forward`` bound to one model; its ``__signature__`` (read by :func:`inspect.signature`) is computed on
    demand, since the base model can change (``unload``, a new adapter) after the wrapper is built."""

    @property
    def __signature__(self) -> inspect.Signature:
        model = self.args[0]
        own = inspect.signature(self.func)
        own = own.replace(parameters=list(own.parameters.values())[1:])  # without self
        get_base = getattr(type(model), "get_base_model", None)
        base = get_base(model) if get_base is not None else None
        try:
            signature = inspect.signature(base.forward)
        except (AttributeError, TypeError, ValueError):  # no base model, or a forward inspect cannot read
            return own
        return with_own_parameter(signature)

    def __repr__(self) -> str:
        return f"<bound method {self.func.__qualname__} of {type(self.args[0]).__name__}>"


def with_own_parameter(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` plus a keyword-only ``adapter_names=None`` (before ``**kwargs`` if it has one)."""
    params = list(signature.parameters.values())
    if any(p.name == OWN_PARAMETER for p in params):
        return signature
    own = inspect.Parameter(OWN_PARAMETER, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return signature.replace(parameters=params[:at] + [own] + params[at:])
