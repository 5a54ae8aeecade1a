"""Diagonal posterior precision ``P = c diag(H) + diag(p)``, ``(n_params,)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from laplace.checkpoint import tensor_entry
from laplace.structures.blocks import Block, diag_blocks
from laplace.structures.protocol import Layout, PosteriorStructure, Precision, Spectrum
from laplace.utils.memo import Memo
from laplace.utils.utils import expand_to_parameters

__all__ = ["DiagonalStructure", "DiagonalPrecision"]


class DiagonalPrecision(Precision):
    """``P = c H + p`` for diagonal ``H`` and ``p``, ``(P,)``."""

    def __init__(self, H: Tensor, factor: Tensor, prior_diag: Tensor) -> None:
        super().__init__()
        self.diagonal = factor * H + prior_diag

    @property
    def public(self) -> Tensor:
        return self.diagonal

    def variance(self) -> Tensor:
        """Posterior variances, ``(P,)``."""
        return self._cached("variance", self.diagonal.reciprocal)

    def scale(self) -> Tensor:
        """Posterior standard deviations, ``(P,)``."""
        return self._cached("scale", self.diagonal.rsqrt)

    def covariance(self) -> Tensor:
        return torch.diag(self.variance())

    def logdet(self) -> Tensor:
        return self.diagonal.log().sum()

    def square_form(self, W: Tensor) -> Tensor:
        return (W * self.variance()) @ W.transpose(-1, -2)

    def square_form_diagonal(self, W: Tensor) -> Tensor:
        return (W.square() * self.variance()).sum(-1)

    def quadratic(self, delta: Tensor) -> Tensor:
        return delta @ (self.diagonal * delta)

    def sample_deviations(self, eps: Tensor) -> Tensor:
        return eps * self.scale()

    def layer_blocks(self, params: Sequence[Tensor]) -> list[Block]:
        return diag_blocks(self.variance(), params)


class DiagonalStructure(PosteriorStructure):
    """``hessian_structure='diag'``: the diagonal of the backend's curvature."""

    name = "diag"
    backend_method = "diag"

    def zero(self, layout: Layout, device: Any, dtype: Any) -> Tensor:
        return torch.zeros(layout.n_params, device=device, dtype=dtype)

    def precision(
        self,
        H: Tensor,
        factor: Tensor,
        prior_precision: Tensor,
        layout: Layout,
        memo: Memo,
    ) -> DiagonalPrecision:
        prior = expand_to_parameters(prior_precision, layout.groups)
        return DiagonalPrecision(H, factor, prior)

    def spectrum(self, H: Tensor, memo: Memo) -> Spectrum:
        return H, H.numel()

    def loaded(self, value: Any, layout: Layout, like: Tensor) -> Tensor:
        return tensor_entry(value, "H", (layout.n_params,), like=like)
