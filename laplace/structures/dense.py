"""Dense posterior precision ``P = c H + diag(p)`` over ``n_params`` parameters.

``H`` is eigendecomposed once (its eigenvalues are cached with ``H``): with a
scalar prior ``P`` shares the eigenvectors of ``H``, so ``log det P`` and the
closed-form prior tuning cost ``O(P)`` per prior value. Everything else goes
through the Cholesky factor ``L`` of ``P`` (``P = L L^T``): the scale
``S = L^{-T}`` (``S S^T = Sigma``), the covariance and the samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from laplace.checkpoint import symmetric_entry, tensor_entry
from laplace.structures.protocol import (
    Layout,
    PosteriorStructure,
    Precision,
    Spectrum,
    not_positive_definite,
)
from laplace.utils.memo import Memo
from laplace.utils.utils import expand_to_parameters

__all__ = ["DenseStructure", "DensePrecision", "cholesky"]


def cholesky(P: Tensor) -> Tensor:
    """Lower Cholesky factor of ``P``; ``ValueError`` if ``P`` is not positive
    definite."""
    L, info = torch.linalg.cholesky_ex(P)
    if info.any():
        raise not_positive_definite()
    return L


class DensePrecision(Precision):
    """``P = c H + diag(p)``, ``(P, P)``.

    Parameters
    ----------
    H : Tensor ``(P, P)``
    factor : Tensor ``()``
    prior_diag : Tensor ``(P,)``
    scalar_prior : Tensor ``(1,)`` or None
        The prior when it is one value (``log det`` from the eigenvalues).
    H_eigenvalues : callable
        Eigenvalues of ``H`` ``(P,)``, computed when first needed.
    """

    assembled_jacobians = True

    def __init__(
        self,
        H: Tensor,
        factor: Tensor,
        prior_diag: Tensor,
        scalar_prior: Tensor | None,
        H_eigenvalues: Callable[[], Tensor],
    ) -> None:
        super().__init__()
        self._H, self._factor, self._prior_diag = H, factor, prior_diag
        self._scalar_prior = scalar_prior
        self._H_eigenvalues = H_eigenvalues

    @property
    def matrix(self) -> Tensor:
        """``P``, ``(P, P)``, formed on each access and not kept: the Cholesky
        factor and the scale are (``log det P`` with a scalar prior needs
        neither)."""
        return self._factor * self._H + torch.diag(self._prior_diag)

    @property
    def public(self) -> Tensor:
        return self.matrix

    def cholesky(self) -> Tensor:
        """Lower Cholesky factor ``L`` of ``P``, ``(P, P)``."""
        return self._cached("cholesky", lambda: cholesky(self.matrix))

    def scale(self) -> Tensor:
        """``S = L^{-T}`` with ``S S^T = Sigma``, ``(P, P)``."""

        def compute() -> Tensor:
            L = self.cholesky()
            eye = torch.eye(len(L), device=L.device, dtype=L.dtype)
            return torch.linalg.solve_triangular(L, eye, upper=False).T

        return self._cached("scale", compute)

    def covariance(self) -> Tensor:
        def compute() -> Tensor:
            S = self.scale()
            return S @ S.T

        return self._cached("covariance", compute)

    def logdet(self) -> Tensor:
        if self._scalar_prior is not None:
            evals = self._factor * self._H_eigenvalues() + self._scalar_prior
            if (evals <= 0).any():
                raise not_positive_definite()
            return evals.log().sum()
        return 2 * self.cholesky().diagonal().log().sum()

    def square_form(self, W: Tensor) -> Tensor:
        WS = W @ self.scale()  # (batch, k, P)
        return WS @ WS.transpose(-1, -2)

    def quadratic(self, delta: Tensor) -> Tensor:
        return delta @ self.matrix @ delta

    def sample_deviations(self, eps: Tensor) -> Tensor:
        # rows eps S^T with S = L^{-T}: solve L^T d^T = eps^T, half the work of
        # a dense product with S
        L = self.cholesky()
        return torch.linalg.solve_triangular(L.mT, eps.mT, upper=True).mT


class DenseStructure(PosteriorStructure):
    """``hessian_structure='full'``: the dense GGN/EF/Hessian of the backend."""

    name = "full"
    backend_method = "full"

    def zero(self, layout: Layout, device: Any, dtype: Any) -> Tensor:
        n = layout.n_params
        return torch.zeros(n, n, device=device, dtype=dtype)

    def precision(
        self,
        H: Tensor,
        factor: Tensor,
        prior_precision: Tensor,
        layout: Layout,
        memo: Memo,
    ) -> DensePrecision:
        scalar = prior_precision if prior_precision.numel() == 1 else None
        return DensePrecision(
            H,
            factor,
            expand_to_parameters(prior_precision, layout.groups),
            scalar,
            lambda: self.eigenvalues(H, memo),
        )

    @staticmethod
    def eigenvalues(H: Tensor, memo: Memo) -> Tensor:
        """Eigenvalues of ``H`` ``(P,)``, computed once per ``H``."""
        return memo.get("H_eigenvalues", (H,), lambda: torch.linalg.eigvalsh(H))

    def spectrum(self, H: Tensor, memo: Memo) -> Spectrum:
        return self.eigenvalues(H, memo), 1

    def loaded(self, value: Any, layout: Layout, like: Tensor) -> Tensor:
        n = layout.n_params
        return symmetric_entry(tensor_entry(value, "H", (n, n), like=like), "H")
