"""Full-covariance Laplace: a dense ``(n_params, n_params)`` posterior precision."""

from __future__ import annotations

from typing import Any

import torch

from laplace.checkpoint import symmetric_entry, tensor_entry
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.layer_curvature import exact_ggn_closure

__all__ = ["FullLaplace"]


class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense posterior precision
    ``P = H / (sigma^2 T) + diag(prior_precision)``.

    The curvature ``H`` is eigendecomposed once after ``fit``; with a scalar prior
    the log-determinant (and so marginal-likelihood tuning) then costs ``O(P)``.
    """

    _key = ("all", "full")

    def _zero_H(self) -> torch.Tensor:
        return torch.zeros(
            self.n_params, self.n_params, device=self._device, dtype=self._dtype
        )

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        found = exact_ggn_closure(self, X, y, "full")
        if found is not None:
            return found
        loss, H = self.backend.full(X, y)
        return loss, H.to(self._dtype)

    def _posterior_state(self, H: torch.Tensor) -> dict[str, Any]:
        return {"H": H, "_H_eigenvalues": None}

    def _validated_H(self, value: Any) -> torch.Tensor:
        P = self.n_params
        return symmetric_entry(
            tensor_entry(value, "H", (P, P), like=self.prior_precision), "H"
        )

    def _hyperparameters_changed(self) -> None:
        self._scale_cache = None
        self._cov_cache = None
        self._chol_cache = None

    @property
    def H_eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the curvature ``H`` (computed once, cached)."""
        if getattr(self, "_H_eigenvalues", None) is None:
            self._H_eigenvalues = torch.linalg.eigvalsh(self._H)
        return self._H_eigenvalues

    @property
    def _posterior_precision(self) -> torch.Tensor:
        """``(n_params, n_params)``."""
        self._check_fitted()
        return self._H_factor * self._H + torch.diag(self.prior_precision_diag)

    @property
    def posterior_scale(self) -> torch.Tensor:
        """``S`` with ``S S^T = P^{-1}`` (inverse transposed Cholesky factor of
        ``P``), ``(n_params, n_params)``."""
        needs_graph = torch.is_grad_enabled() and self._hyperparameters_need_grad()
        if self._scale_cache is not None and not needs_graph:
            return self._scale_cache
        L = self._posterior_cholesky()
        eye = torch.eye(self.n_params, device=L.device, dtype=L.dtype)
        scale = torch.linalg.solve_triangular(L, eye, upper=False).T
        if not needs_graph:
            self._scale_cache = scale.detach()
        return scale

    def _posterior_cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor ``L`` of ``P = L L^T`` (cached like the scale)."""
        needs_graph = torch.is_grad_enabled() and self._hyperparameters_need_grad()
        if self._chol_cache is not None and not needs_graph:
            return self._chol_cache
        L = self._cholesky(self._posterior_precision)
        if not needs_graph:
            self._chol_cache = L.detach()
        return L

    def _hyperparameters_need_grad(self) -> bool:
        return any(
            t.requires_grad
            for t in (self.prior_precision, self.sigma_noise, self.prior_mean)
        )

    @staticmethod
    def _cholesky(P: torch.Tensor) -> torch.Tensor:
        L, info = torch.linalg.cholesky_ex(P)
        if info.any():
            raise ValueError(
                "The posterior precision is not positive definite; increase the "
                "prior precision or use a GGN/EF backend (the Hessian can be "
                "indefinite away from a minimum)."
            )
        return L

    @property
    def posterior_covariance(self) -> torch.Tensor:
        """``P^{-1}``, ``(n_params, n_params)`` (cached like the scale)."""
        needs_graph = torch.is_grad_enabled() and self._hyperparameters_need_grad()
        if self._cov_cache is not None and not needs_graph:
            return self._cov_cache
        scale = self.posterior_scale
        cov = scale @ scale.T
        if not needs_graph:
            self._cov_cache = cov.detach()
        return cov

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        if self.prior_precision.numel() == 1:
            # P = c H + p I shares the eigenvectors of H
            evals = self._H_factor * self.H_eigenvalues + self.prior_precision
            if (evals <= 0).any():
                raise ValueError(
                    "The posterior precision is not positive definite; increase "
                    "the prior precision."
                )
            return evals.log().sum()
        L = self._cholesky(self._posterior_precision)
        return 2 * L.diagonal().log().sum()

    def _H_spectrum(self) -> tuple[torch.Tensor, int]:
        return self.H_eigenvalues, 1

    def _glm_fast_route(
        self, x: Any, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Jacobians from layer factors: cheaper than per-sample autograd
        if not self._treats_all_weights:
            return None
        return self._per_layer_glm(x, None, diagonal)

    def _cov_square_form(self, W: torch.Tensor) -> torch.Tensor:
        WS = W @ self.posterior_scale  # (batch, k, P)
        return WS @ WS.transpose(-1, -2)

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        return delta @ self._posterior_precision @ delta

    def _sample_deviations(self, eps: torch.Tensor) -> torch.Tensor:
        # rows eps S^T with S = L^{-T}: solve L^T d^T = eps^T, half the work of a
        # dense product with S
        L = self._posterior_cholesky()
        return torch.linalg.solve_triangular(L.mT, eps.mT, upper=True).mT
