"""Small dense linear-algebra helpers shared by the curvature structures.

Every function keeps the device and dtype of its input.  Symmetric
eigendecompositions go through :func:`symeig`, which is robust to the
occasional convergence failure of ``torch.linalg.eigh`` on nearly singular
curvature factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "block_diag",
    "diagonal_add_scalar",
    "invsqrt_precision",
    "kron",
    "symeig",
]

# ``torch.linalg.eigh`` has no half-precision kernels, so these go to float64.
_NO_EIGH_KERNEL = (torch.float16, torch.bfloat16)


def kron(t1: Tensor, t2: Tensor) -> Tensor:
    """Kronecker product of two matrices.

    Parameters
    ----------
    t1 : Tensor
        `(m, n)`.
    t2 : Tensor
        `(p, q)`.

    Returns
    -------
    Tensor
        `(m * p, n * q)`, with ``torch.kron`` semantics: block ``(i, j)`` is
        ``t1[i, j] * t2``.
    """
    return torch.kron(t1, t2)


def block_diag(blocks: Sequence[Tensor]) -> Tensor:
    """Dense block-diagonal matrix.

    Parameters
    ----------
    blocks : sequence of Tensor
        Matrices of shapes `(m_i, n_i)`, all on one device with one dtype.

    Returns
    -------
    Tensor
        `(sum m_i, sum n_i)`.
    """
    blocks = list(blocks)
    if len(blocks) == 0:
        raise ValueError("block_diag: `blocks` is empty; pass at least one matrix.")
    return torch.block_diag(*blocks)


def _square_check(M: Tensor, name: str, fn: str) -> None:
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(
            f"{fn}: `{name}` must be a square matrix (or a batch of them) of shape "
            f"(..., n, n), got shape {tuple(M.shape)}."
        )


def diagonal_add_scalar(X: Tensor, value: float | Tensor) -> Tensor:
    """Return ``X + value * I`` without modifying ``X``.

    Parameters
    ----------
    X : Tensor
        `(..., n, n)`.
    value : float or Tensor
        Scalar (0-dim tensors keep the autograd graph).

    Returns
    -------
    Tensor
        `(..., n, n)`, a new tensor.
    """
    _square_check(X, "X", "diagonal_add_scalar")
    out = X.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(value)
    return out


def _eigh_with_jitter(M: Tensor) -> tuple[Tensor, Tensor]:
    # UPLO="U": only the upper triangle is read, as in laplace-torch
    try:
        return torch.linalg.eigh(M, UPLO="U")
    except torch.linalg.LinAlgError:
        pass
    # A shift by c*I leaves the eigenvectors unchanged and moves every
    # eigenvalue by c, so subtracting c afterwards recovers M's spectrum while
    # the shifted problem is better separated from the failing case.
    scale = M.diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1, keepdim=True)
    eps = torch.finfo(M.dtype).eps
    jitter = eps**0.5 * scale + eps
    eigvals, eigvecs = torch.linalg.eigh(M + _eye_like(M) * jitter[..., None], UPLO="U")
    return eigvals - jitter, eigvecs


def _eye_like(M: Tensor) -> Tensor:
    return torch.eye(M.shape[-1], device=M.device, dtype=M.dtype)


def symeig(M: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition of a positive semi-definite matrix, read
    from its upper triangle (``UPLO='U'``, as laplace-torch).

    Tries ``torch.linalg.eigh``; on failure retries with a small diagonal
    jitter (removed again from the eigenvalues), and for lower-precision
    inputs falls back to float64 and casts the result back.

    Parameters
    ----------
    M : Tensor
        `(..., p, p)` symmetric PSD matrix (or batch of them).

    Returns
    -------
    eigenvalues : Tensor
        `(..., p)`, ascending, clamped to be non-negative.
    eigenvectors : Tensor
        `(..., p, p)`, orthonormal columns.
    """
    _square_check(M, "M", "symeig")
    if M.dtype in _NO_EIGH_KERNEL:
        eigvals, eigvecs = _eigh_float64(M)
    else:
        try:
            eigvals, eigvecs = _eigh_with_jitter(M)
        except torch.linalg.LinAlgError:
            if M.dtype == torch.float64:
                raise
            eigvals, eigvecs = _eigh_float64(M)
    # Curvature factors (GGN/Fisher Kronecker factors) are PSD in exact
    # arithmetic; negative eigenvalues are round-off and would break logs and
    # square roots downstream.
    return eigvals.clamp(min=0.0), eigvecs


def _eigh_float64(M: Tensor) -> tuple[Tensor, Tensor]:
    try:
        eigvals, eigvecs = _eigh_with_jitter(M.to(torch.float64))
    except torch.linalg.LinAlgError as err:
        raise torch.linalg.LinAlgError(
            f"symeig: eigendecomposition of a {tuple(M.shape)} {M.dtype} matrix failed "
            "even with diagonal jitter in float64; check `M` for NaN/inf entries."
        ) from err
    return eigvals.to(M.dtype), eigvecs.to(M.dtype)


def invsqrt_precision(M: Tensor) -> Tensor:
    """Posterior scale ``S`` of a precision matrix, with ``S @ S.T = M^{-1}``.

    Computed as the inverse-transposed Cholesky factor: ``M = L L^T`` and
    ``S = L^{-T}`` (upper triangular), via a triangular solve.

    Parameters
    ----------
    M : Tensor
        `(..., p, p)` symmetric positive-definite precision.

    Returns
    -------
    Tensor
        `(..., p, p)` upper-triangular posterior scale.
    """
    _square_check(M, "M", "invsqrt_precision")
    try:
        L = torch.linalg.cholesky(M)
    except torch.linalg.LinAlgError as err:
        raise torch.linalg.LinAlgError(
            f"invsqrt_precision: `M` of shape {tuple(M.shape)} is not positive "
            "definite (Cholesky failed); increase the prior precision."
        ) from err
    return torch.linalg.solve_triangular(L.mT, _eye_like(M).expand_as(M), upper=True)
