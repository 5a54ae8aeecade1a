"""Small helpers of the laplace-torch ``laplace.utils`` namespace."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Number
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from laplace.utils.enums import PriorStructure
from laplace.utils.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    symeig,
)
from laplace.utils.subsets import SoDSampler
from laplace.utils.validation_score import validate

__all__ = [
    "get_nll",
    "validate",
    "parameters_per_layer",
    "invsqrt_precision",
    "kron",
    "diagonal_add_scalar",
    "symeig",
    "block_diag",
    "normal_samples",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "SoDSampler",
    "_is_batchnorm",
    "_is_valid_scalar",
]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad=True``: the ones a Laplace approximation
    treats probabilistically."""
    return [p for p in model.parameters() if p.requires_grad]


def parameters_per_layer(model: nn.Module) -> list[int]:
    """Number of treated parameters of each parameter tensor ("layer")."""
    return [p.numel() for p in trainable_parameters(model)]


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def _is_valid_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, Number) and not isinstance(value, bool)


def expand_prior_precision(prior_prec: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Expand a scalar, per-layer or per-parameter prior precision to ``(n_params,)``."""
    sizes = parameters_per_layer(model)
    return expand_to_parameters(prior_prec, sizes)


def expand_to_parameters(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Broadcast ``values`` of length 1, ``len(sizes)`` or ``sum(sizes)`` to
    ``(sum(sizes),)``."""
    n_params = sum(sizes)
    values = torch.as_tensor(values).reshape(-1)
    if len(values) == 1:
        return values.expand(n_params)
    if len(values) == len(sizes):
        counts = torch.as_tensor(sizes, device=values.device)
        return torch.repeat_interleave(values, counts)
    if len(values) == n_params:
        return values
    raise ValueError(
        f"Invalid prior precision of length {len(values)}: expected 1 (scalar), "
        f"{len(sizes)} (one per layer) or {n_params} (one per parameter)."
    )


def fix_prior_prec_structure(
    prior_prec_init: torch.Tensor | float,
    prior_structure: PriorStructure | str,
    n_layers: int,
    n_params: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Initial prior precision of the length that ``prior_structure`` asks for."""
    structure = PriorStructure.parse(prior_structure, "prior_structure")
    size = {
        PriorStructure.SCALAR: 1,
        PriorStructure.LAYERWISE: n_layers,
        PriorStructure.DIAG: n_params,
    }[structure]
    init = torch.as_tensor(prior_prec_init, device=device, dtype=dtype).reshape(-1)
    if len(init) == 1:
        return init.expand(size).clone()
    if len(init) != size:
        raise ValueError(
            f"init_prior_prec has length {len(init)} but prior_structure="
            f"{structure.value!r} needs 1 or {size} values."
        )
    return init.clone()


def normal_samples(
    mean: torch.Tensor,
    var: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``(n_samples, *mean.shape)`` samples of N(mean, var).

    ``var`` is either the diagonal, of the shape of ``mean``, or per-row covariance
    matrices ``(batch, n, n)`` for ``mean`` of shape ``(batch, n)``.
    """
    if var.shape == mean.shape:
        eps = torch.randn(
            (n_samples, *mean.shape),
            device=mean.device,
            dtype=mean.dtype,
            generator=generator,
        )
        return mean + var.sqrt() * eps
    scale = psd_sqrt(var)
    eps = torch.randn(
        (n_samples, *mean.shape, 1),
        device=mean.device,
        dtype=mean.dtype,
        generator=generator,
    )
    return mean + (scale @ eps).squeeze(-1)


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """A matrix square root ``S`` with ``S @ S.T == cov`` for (batches of) positive
    semi-definite ``cov``; rank-deficient inputs are fine (eigendecomposition, not
    Cholesky, since predictive covariances of classifiers are often singular)."""
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def get_nll(out_dist: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of class probabilities ``(batch, n_classes)``."""
    eps = torch.finfo(out_dist.dtype).tiny
    return torch.nn.functional.nll_loss(out_dist.clamp_min(eps).log(), targets)


def concat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(tensors), dim=0)
