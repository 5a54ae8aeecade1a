"""Argument checks of :func:`laplace.marglik_training.marglik_training`."""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import nn

from laplace.likelihoods import likelihood_model
from laplace.utils.enums import HessianStructure, Likelihood, PriorStructure

__all__ = ["check_arguments", "without_weight_decay"]

_STRUCTURES = (HessianStructure.FULL, HessianStructure.KRON, HessianStructure.DIAG)


def without_weight_decay(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {"weight_decay": 0.0}
    if not isinstance(kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict or None; got {type(kwargs)}.")
    if kwargs.get("weight_decay", 0) != 0:
        warnings.warn(
            f"optimizer_kwargs weight_decay={kwargs['weight_decay']} is ignored: the "
            "prior precision takes the role of weight decay in marglik_training.",
            stacklevel=3,
        )
    return {**kwargs, "weight_decay": 0.0}


def check_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """Validate the arguments of :func:`marglik_training`; return parsed enums."""
    if not isinstance(args["model"], nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(args['model'])}.")
    likelihood = Likelihood.parse(args["likelihood"], "likelihood")
    structure = HessianStructure.parse(args["hessian_structure"], "hessian_structure")
    if structure not in _STRUCTURES:
        raise ValueError(
            f"Invalid hessian_structure={structure.value!r} for marglik_training; "
            f"allowed values are {[s.value for s in _STRUCTURES]}."
        )
    prior_structure = PriorStructure.parse(args["prior_structure"], "prior_structure")
    if structure is HessianStructure.KRON and prior_structure is PriorStructure.DIAG:
        raise ValueError(
            "prior_structure='diag' is not available with hessian_structure='kron' "
            "(a per-parameter prior breaks the Kronecker structure); use 'scalar' or "
            "'layerwise'."
        )
    for name, minimum in (
        ("n_epochs", 1),
        ("n_epochs_burnin", 0),
        ("n_hypersteps", 0),
        ("marglik_frequency", 1),
    ):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    for name in ("lr_hyp", "sigma_noise_init", "temperature"):
        value = args[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    if not likelihood_model(likelihood).has_noise and args["sigma_noise_init"] != 1:
        raise ValueError(
            f"sigma_noise_init={args['sigma_noise_init']!r} is only meaningful for "
            f"regression; it must be 1 for likelihood={likelihood.value!r}."
        )
    if args["scheduler_kwargs"] is not None and not isinstance(
        args["scheduler_kwargs"], dict
    ):
        raise TypeError(
            f"scheduler_kwargs must be a dict or None; got "
            f"{type(args['scheduler_kwargs'])}."
        )
    for name in ("dict_key_x", "dict_key_y"):
        if not isinstance(args[name], str):
            raise TypeError(f"{name} must be a str; got {args[name]!r}.")
    return {
        "likelihood": likelihood,
        "structure": structure.value,
        "prior_structure": prior_structure,
    }
