"""Covariances of a sparse (inducing-point) GP with a linear kernel
``K0(x, x') = J(x) J(x')^T`` scaled by ``1 / delta``, as VaLLA uses them.

With ``C = chol(K0_ZZ)`` and ``W = C^{-1} K0_Zx``:

- conditional prior covariance ``K0_xx - K0_xZ K0_ZZ^{-1} K0_Zx = K0_xx - W^T W``,
- in the whitened parametrisation ``S = C L L^T C^T`` (lower triangular ``L``),
  ``A S A^T`` for ``A = K0_xZ K0_ZZ^{-1}`` is ``T T^T`` with ``T = W^T L``.
"""

from __future__ import annotations

import warnings

import torch

__all__ = [
    "conditional_parts",
    "pack_lower",
    "stable_cholesky",
    "unpack_lower",
    "variational_covariance",
]


def stable_cholesky(K: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of the PSD ``K`` ``(k, k)``; when ``K`` is singular
    (more inducing outputs than parameters) a growing jitter relative to its mean
    diagonal is added, with a warning."""
    chol, info = torch.linalg.cholesky_ex(K)
    if not info:
        return chol
    scale = K.diagonal().mean()
    eye = torch.eye(len(K), device=K.device, dtype=K.dtype)
    for exponent in range(-10, 0):
        chol, info = torch.linalg.cholesky_ex(K + 10.0**exponent * scale * eye)
        if not info:
            warnings.warn(
                "The NTK Gram matrix of the inducing points is singular; added a "
                f"jitter of 1e{exponent} times its mean diagonal.",
                stacklevel=3,
            )
            return chol
    raise ValueError("The NTK Gram matrix of the inducing points is not PSD.")


def pack_lower(L: torch.Tensor) -> torch.Tensor:
    """Row-major lower triangle of ``L`` ``(k, k)`` as ``(k (k + 1) / 2,)``."""
    rows, cols = torch.tril_indices(len(L), len(L), device=L.device)
    return L[rows, cols]


def unpack_lower(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower`: ``(k, k)`` lower triangular."""
    rows, cols = torch.tril_indices(k, k, device=packed.device)
    L = torch.zeros(k, k, device=packed.device, dtype=packed.dtype)
    return L.index_put((rows, cols), packed)


def conditional_parts(
    Js: torch.Tensor, J_Z: torch.Tensor, chol_K0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` ``(k, batch, O)`` and the conditional prior covariance
    ``K0_xx - W^T W`` ``(batch, O, O)`` for Jacobians ``Js`` ``(batch, O, P)``,
    inducing Jacobians ``J_Z`` ``(k, P)`` and ``chol_K0 = chol(J_Z J_Z^T)``."""
    batch, n_out, n_params = Js.shape
    C = (Js.reshape(-1, n_params) @ J_Z.T).T  # (k, batch * O)
    W = torch.linalg.solve_triangular(chol_K0, C, upper=False)
    W = W.reshape(-1, batch, n_out)
    prior_cov = Js @ Js.mT - torch.einsum("kbo,kbp->bop", W, W)
    return W, prior_cov


def variational_covariance(W: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``A S A^T`` per input, ``(batch, O, O)``, from ``W`` ``(k, batch, O)`` and the
    whitened factor ``L`` ``(k, k)`` of ``S = C L L^T C^T``."""
    T = torch.einsum("kbo,kl->bol", W, L)
    return T @ T.mT
