"""Terms of VaLLA's objective: the alpha-energy of a sparse GP (Li & Gal, 2017;
Villacampa-Calvo & Hernandez-Lobato, 2020)

    E_alpha(q) = sum_n 1/alpha log E_q(f_n)[p(y_n | f_n)^alpha] - KL(q(u) || p(u)),

which tends to the ELBO ``sum_n E_q[log p(y_n | f_n)] - KL`` as ``alpha -> 0``.
The marginals ``q(f_n) = N(mean_n, cov_n)`` have ``mean`` ``(batch, O)`` and ``cov``
``(batch, O, O)``.
"""

from __future__ import annotations

import math

import torch

from laplace.predictive import probit_probs

__all__ = [
    "categorical_energy",
    "check_alpha_arguments",
    "gaussian_energy",
    "inducing_kl",
]


def gaussian_energy(
    y: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    noise_var: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Summed energy of ``y`` ``(batch, O)`` under ``N(y | f, noise_var I)``, ``()``.

    Closed form: ``int N(y | f, s)^alpha N(f | m, V) df = (2 pi s)^((1 - alpha) / 2)
    alpha^(-1/2) N(y | m, V + s / alpha)`` per output dimension.
    """
    n_out = mean.shape[-1]
    resid = y - mean
    if alpha == 0:
        quad = resid.square().sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        log_norm = n_out * torch.log(2 * math.pi * noise_var)
        return -0.5 * (log_norm + quad / noise_var).sum()
    eye = torch.eye(n_out, device=mean.device, dtype=mean.dtype)
    chol = torch.linalg.cholesky(cov + noise_var / alpha * eye)
    white = torch.linalg.solve_triangular(chol, resid.unsqueeze(-1), upper=False)
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_pdf = -0.5 * (white.square().sum((-2, -1)) + log_det)
    log_pdf = log_pdf - 0.5 * n_out * math.log(2 * math.pi)
    const = 0.5 * n_out * ((1 - alpha) * torch.log(2 * math.pi * noise_var))
    const = const - 0.5 * n_out * math.log(alpha)
    return (const + log_pdf).sum() / alpha


def categorical_energy(
    y: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    alpha: float,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Summed energy of class indices ``y`` ``(batch,)`` under the softmax
    likelihood, ``()``.

    ``n_samples > 0``: Monte Carlo over reparameterised logits. ``n_samples = 0``
    (only for ``alpha = 1``): ``log E_q[softmax(f)_y]`` by the probit
    approximation.
    """
    if n_samples == 0:
        if alpha != 1:
            raise ValueError("n_samples=0 is only possible for alpha=1.")
        probs = probit_probs(mean, cov.diagonal(dim1=-2, dim2=-1))
        tiny = torch.finfo(probs.dtype).tiny
        return probs.gather(-1, y.reshape(-1, 1)).clamp_min(tiny).log().sum()
    n_out = mean.shape[-1]
    eye = torch.eye(n_out, device=mean.device, dtype=mean.dtype)
    # cov is PSD, often singular; a relative jitter of machine precision keeps
    # the Cholesky factor (and its gradient) defined.
    jitter = torch.finfo(mean.dtype).eps * cov.diagonal(dim1=-2, dim2=-1).mean(-1)
    chol = torch.linalg.cholesky(cov + (jitter.detach() + 1e-30)[:, None, None] * eye)
    eps = torch.randn(
        n_samples,
        *mean.shape,
        1,
        device=mean.device,
        dtype=mean.dtype,
        generator=generator,
    )
    logits = mean + (chol @ eps).squeeze(-1)  # (S, batch, O)
    index = y.reshape(1, -1, 1).expand(n_samples, -1, 1)
    log_lik = torch.log_softmax(logits, -1).gather(-1, index).squeeze(-1)  # (S, batch)
    if alpha == 0:
        return log_lik.mean(0).sum()
    log_mean = torch.logsumexp(alpha * log_lik, 0) - math.log(n_samples)
    return log_mean.sum() / alpha


def inducing_kl(L: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``KL(N(m, C L L^T C^T) || N(m, C C^T / delta))`` for lower triangular ``L``
    ``(k, k)`` in the whitened parametrisation (any ``C``), ``()``."""
    k = L.shape[-1]
    log_det = 2 * L.diagonal().abs().log().sum()
    return 0.5 * (delta * L.square().sum() - k - k * torch.log(delta) - log_det)


def check_alpha_arguments(alpha: object, mc_softmax_samples: object) -> float:
    """Validate ``alpha`` in [0, 1] and ``mc_softmax_samples >= 0``; returns
    ``float(alpha)``."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"alpha must be a number in [0, 1]; got {alpha!r}.")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")
    if (
        isinstance(mc_softmax_samples, bool)
        or not isinstance(mc_softmax_samples, int)
        or mc_softmax_samples < 0
    ):
        raise ValueError(
            "mc_softmax_samples must be a non-negative int; got "
            f"{mc_softmax_samples!r}."
        )
    return float(alpha)
