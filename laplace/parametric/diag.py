"""Diagonal Laplace: a ``(n_params,)`` posterior precision."""

from __future__ import annotations

from typing import Any

import torch

from laplace.checkpoint import tensor_entry
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.fast_glm import diag_blocks
from laplace.parametric.layer_curvature import exact_ggn_closure

__all__ = ["DiagLaplace"]


class DiagLaplace(ParametricLaplace):
    """Laplace approximation with a diagonal posterior precision
    ``P = diag(H) / (sigma^2 T) + prior_precision``."""

    _key = ("all", "diag")

    def _zero_H(self) -> torch.Tensor:
        return torch.zeros(self.n_params, device=self._device, dtype=self._dtype)

    def _validated_H(self, value: Any) -> torch.Tensor:
        return tensor_entry(value, "H", (self.n_params,), like=self.prior_precision)

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        if not self._diag_kwargs():
            found = exact_ggn_closure(self, X, y, "diag")
            if found is not None:
                return found
        loss, H = self.backend.diag(X, y, **self._diag_kwargs())
        return loss, H.to(self._dtype)

    def _diag_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def _posterior_precision(self) -> torch.Tensor:
        """``(n_params,)``."""
        self._check_fitted()
        return self._H_factor * self._H + self.prior_precision_diag

    @property
    def posterior_scale(self) -> torch.Tensor:
        """Posterior standard deviations, ``(n_params,)``."""
        return self._posterior_precision.rsqrt()

    @property
    def posterior_variance(self) -> torch.Tensor:
        """Posterior variances, ``(n_params,)``."""
        return self._posterior_precision.reciprocal()

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        return self._posterior_precision.log().sum()

    def _H_spectrum(self) -> tuple[torch.Tensor, int]:
        return self._H, self._H.numel()

    def _cov_square_form(self, W: torch.Tensor) -> torch.Tensor:
        return (W * self.posterior_variance) @ W.transpose(-1, -2)

    def _functional_variance_diag(self, Js: torch.Tensor) -> torch.Tensor:
        return (Js.square() * self.posterior_variance).sum(-1)

    def _glm_fast_route(
        self, x: Any, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # per layer with identity bases: no Jacobians (see fast_glm)
        if not self._treats_all_weights:
            return None
        blocks = diag_blocks(self.posterior_variance, self.params)
        return self._per_layer_glm(x, blocks, diagonal)

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        return delta @ (self._posterior_precision * delta)

    def _sample_deviations(self, eps: torch.Tensor) -> torch.Tensor:
        return eps * self.posterior_scale
