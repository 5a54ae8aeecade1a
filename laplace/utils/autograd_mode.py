"""Autograd on for ``fit``, whatever mode the caller is in, and the model's
gradient state (``.grad``, ``requires_grad``) as it was afterwards.

Curvature needs gradients, so a ``fit`` called under ``torch.no_grad()`` or
``torch.inference_mode()`` (common in evaluation code) turns them back on for its
own duration; tensors the caller created under inference mode are copied into
ordinary tensors before autograd sees them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["autograd_enabled", "ordinary_tensors", "preserve_model_gradients"]

F = TypeVar("F", bound=Callable[..., Any])


def autograd_enabled(fit: F) -> F:
    """Decorate a ``fit(self, ...)`` method to run with autograd enabled and
    inference mode off; the caller's mode is restored on return or raise."""

    @functools.wraps(fit)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            _check_parameters(self.model)
            return fit(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _check_parameters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_inference():
            raise ValueError(
                f"Parameter {name!r} is an inference tensor (the model was built or "
                "loaded under torch.inference_mode()), so no gradient can flow "
                "through it; build or load the model outside inference_mode, or "
                "replace its parameters by clones made outside it."
            )


def ordinary_tensors(value: Any) -> Any:
    """``value`` with every inference tensor (created under
    ``torch.inference_mode()``) replaced by an ordinary copy, recursively through
    mappings, lists and tuples; other values are returned as they are."""
    if isinstance(value, torch.Tensor):
        if not value.is_inference():
            return value
        with torch.inference_mode(False):
            return value.clone()
    if isinstance(value, Mapping):
        if not any(_has_inference(v) for v in value.values()):
            return value
        copy = dict(value) if type(value) is dict else value.copy()
        for key, item in value.items():
            copy[key] = ordinary_tensors(item)
        return copy
    if isinstance(value, list | tuple) and any(_has_inference(v) for v in value):
        return type(value)(ordinary_tensors(v) for v in value)
    return value


def _has_inference(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_inference()
    if isinstance(value, Mapping):
        return any(_has_inference(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_inference(v) for v in value)
    return False


def preserve_model_gradients(fit: F) -> F:
    """Decorate a method of an object with a ``model`` so that the ``.grad``
    (``None`` included) and ``requires_grad`` of every model parameter are as
    before the call, on return and on raise, whatever autograd work the method
    does (a user may call it between ``backward`` and ``optimizer.step``)."""

    @functools.wraps(fit)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = list(self.model.parameters())
        # clones: backward() accumulates into an existing .grad in place
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            return fit(self, *args, **kwargs)
        finally:
            for p, grad, flag in zip(params, grads, flags):
                p.requires_grad_(flag)
                p.grad = grad

    return wrapper  # type: ignore[return-value]
