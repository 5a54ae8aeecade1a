"""Draws from Gaussians with (possibly singular) covariances."""

from __future__ import annotations

import torch

__all__ = ["draw_gaussian"]


def draw_gaussian(
    mean: torch.Tensor,
    covariance: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples of Gaussians with (possibly singular) covariances.

    Parameters
    ----------
    mean : Tensor
        ``[B, C]`` (one Gaussian per row) or ``[B*C]`` (one joint Gaussian).
    covariance : Tensor
        ``[B, C, C]`` for a ``[B, C]`` mean (or ``[B, C]`` variances), or
        ``[B*C, B*C]`` for a ``[B*C]`` mean. Rank-deficient is fine: the square
        root comes from an eigendecomposition, not Cholesky, and samples stay in
        the range of the covariance.
    n_samples : int
    generator : torch.Generator, optional

    Returns
    -------
    Tensor
        ``[n_samples, B, C]`` or ``[n_samples, B*C]``, in ``mean``'s dtype.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int; got {n_samples!r}.")
    shape = tuple(mean.shape)
    if covariance.shape == mean.shape:  # variances
        eps = _standard_normal((n_samples, *shape), mean, generator)
        return mean + covariance.clamp_min(0).sqrt() * eps
    d = shape[-1] if mean.ndim else 0
    if mean.ndim not in (1, 2) or covariance.shape != (*shape, d):
        raise ValueError(
            "draw_gaussian needs mean [B, C] with covariance [B, C, C] (or [B, C] "
            "variances), or mean [B*C] with covariance [B*C, B*C]; got mean "
            f"{shape} and covariance {tuple(covariance.shape)}."
        )
    scale = _psd_root(covariance)  # (..., d, d) with scale @ scale.mT = cov
    eps = _standard_normal((n_samples, *shape), mean, generator)
    return mean + (scale @ eps.unsqueeze(-1)).squeeze(-1)


def _standard_normal(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)


def _psd_root(covariance: torch.Tensor) -> torch.Tensor:
    """``S`` with ``S S^T = covariance`` for (batches of) PSD matrices; eigenvalues
    at round-off level are zeroed so draws stay in the covariance's range."""
    work = covariance if covariance.dtype in (torch.float32, torch.float64) else None
    work = covariance.float() if work is None else work  # eigh needs float32/64
    evals, evecs = torch.linalg.eigh(0.5 * (work + work.mT))
    tol = evals.abs().amax(-1, keepdim=True) * evals.shape[-1]
    tol = tol * torch.finfo(evals.dtype).eps
    root = evecs * torch.where(evals > tol, evals, 0.0).sqrt().unsqueeze(-2)
    return root.to(covariance.dtype)
