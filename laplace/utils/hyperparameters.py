"""Validation of the hyperparameters of a Laplace approximation.

One function per hyperparameter, shared by the constructors and setters of every
class and by ``load_state_dict`` (which validates a whole state dict before it
assigns anything). Each returns the value as a tensor without moving it or
cutting it from the autograd graph (marginal-likelihood tuning differentiates
through ``prior_precision`` and ``sigma_noise``), and raises ``ValueError``
naming the argument, the value and what is allowed.

Rules (those of laplace-torch 0.3, plus positivity and finiteness):

* ``sigma_noise``: a real number, a 0-d tensor or a 1-d tensor of length 1;
  positive and finite.
* ``prior_precision``: a real number, a 0-d tensor or a 1-d tensor of an allowed
  length (1, one per layer or one per parameter, depending on the class);
  positive and finite.
* ``prior_mean``: a real number, a 0-d tensor or a 1-d tensor of length 1 or
  one per parameter; finite.
* ``temperature``: a positive, finite real number (or one-element tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch

__all__ = [
    "check_prior_mean",
    "check_prior_precision",
    "check_sigma_noise",
    "check_temperature",
]

# allowed 1-d lengths -> what each means (for messages), e.g. {1: "scalar"}
Lengths = Mapping[int, str]


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            return f"tensor {value.detach().cpu().tolist()!r} of shape {tuple(value.shape)}"
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` as a real floating tensor (graph kept), or ``ValueError``."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                f"{name} must be a real number or a real tensor; got a tensor of "
                f"dtype {value.dtype}."
            )
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.get_default_dtype())
    raise ValueError(
        f"{name} must be a real number or a tensor; got {type(value).__name__} "
        f"{_shown(value)}."
    )


def _check_shape(
    tensor: torch.Tensor, name: str, lengths: Lengths | None, owner: str = ""
) -> None:
    """0-d, or 1-d of an allowed length (any length when ``lengths`` is None)."""
    allowed = "" if lengths is None else " of " + _describe(lengths)
    if tensor.ndim >= 2:
        raise ValueError(
            f"{name} must be a scalar or a 1-d tensor{allowed}; got a tensor of "
            f"shape {tuple(tensor.shape)}."
        )
    if tensor.ndim == 1 and tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty; expected a scalar{allowed}.")
    if tensor.ndim == 1 and lengths is not None and len(tensor) not in lengths:
        who = owner or "this Laplace approximation"
        raise ValueError(
            f"{name} has length {len(tensor)}; {who} accepts {_describe(lengths)}."
        )


def _describe(lengths: Lengths) -> str:
    parts = [f"{n} ({what})" for n, what in sorted(lengths.items())]
    return "length " + " or ".join(parts)


def _check_values(tensor: torch.Tensor, name: str, positive: bool) -> None:
    values = tensor.detach()
    finite = bool(torch.isfinite(values).all())
    if finite and (not positive or bool((values > 0).all())):
        return
    rule = "positive and finite" if positive else "finite"
    raise ValueError(f"{name} must be {rule}; got {_shown(tensor)}.")


def check_sigma_noise(value: Any) -> torch.Tensor:
    """Validate the observation noise standard deviation.

    Returns
    -------
    Tensor
        ``()``; a real number, 0-d tensor or length-1 1-d tensor, positive and
        finite.
    """
    tensor = _real_tensor(value, "sigma_noise")
    _check_shape(tensor, "sigma_noise", {1: "scalar"})
    _check_values(tensor, "sigma_noise", positive=True)
    return tensor.reshape(())


def check_prior_precision(
    value: Any, lengths: Lengths | None = None, owner: str = ""
) -> torch.Tensor:
    """Validate a prior precision.

    Parameters
    ----------
    value : float or Tensor
    lengths : mapping of int to str, optional
        Allowed lengths of a 1-d value and their meaning, e.g.
        ``{1: "scalar", n_layers: "one per layer", n_params: "one per
        parameter"}``; any length when ``None`` (sizes not known yet).
    owner : str, optional
        Name of the class that sets these lengths, for the message.

    Returns
    -------
    Tensor
        ``(n,)`` with ``n`` 1 for a scalar input; positive and finite.
    """
    tensor = _real_tensor(value, "prior_precision")
    _check_shape(tensor, "prior_precision", lengths, owner)
    _check_values(tensor, "prior_precision", positive=True)
    return tensor.reshape(-1)


def check_prior_mean(
    value: Any, lengths: Lengths | None = None, owner: str = ""
) -> torch.Tensor:
    """Validate a prior mean (``lengths``, ``owner`` as for
    :func:`check_prior_precision`).

    Returns
    -------
    Tensor
        ``()`` for a number or 0-d tensor, else ``(n,)``; finite.
    """
    tensor = _real_tensor(value, "prior_mean")
    _check_shape(tensor, "prior_mean", lengths, owner)
    _check_values(tensor, "prior_mean", positive=False)
    return tensor


def check_temperature(value: Any) -> float:
    """Validate the likelihood temperature: a positive, finite real number."""
    tensor = _real_tensor(value, "temperature")
    if tensor.numel() != 1:
        raise ValueError(
            f"temperature must be a scalar; got a tensor of shape "
            f"{tuple(tensor.shape)}."
        )
    number = float(tensor.detach())
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"temperature must be positive and finite; got {number}.")
    return number
