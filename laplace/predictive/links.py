"""Link approximations: from a Gaussian over logits to class probabilities.

All functions take the latent mean ``f_mu`` of shape ``(batch, n_classes)`` and the
latent covariance ``f_var`` of shape ``(batch, n_classes, n_classes)`` and return
probabilities ``(batch, n_classes)``.
"""

from __future__ import annotations

import math

import torch

from laplace.utils.enums import LinkApprox
from laplace.utils.utils import normal_samples


def probit_probs(f_mu: torch.Tensor, f_var_diag: torch.Tensor) -> torch.Tensor:
    """Generalised probit approximation (MacKay 1992): softmax of the logits scaled
    by ``1 / sqrt(1 + pi/8 * var)``; needs only the diagonal ``(batch, n_classes)``."""
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * f_var_diag)
    return torch.softmax(kappa * f_mu, dim=-1)


def _sum_zero_projection(
    f_mu: torch.Tensor, f_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition N(f_mu, f_var) on sum(f) = 0, which leaves the softmax unchanged
    and is the form the Laplace bridge assumes (Hobbhahn et al., 2022, Sec. 3).
    Rows with ``1^T Sigma 1 = 0`` (then ``Sigma 1 = 0``) are left as they are."""
    row_sums = f_var.sum(-1)  # Sigma 1, (batch, K)
    total = row_sums.sum(-1, keepdim=True)  # 1^T Sigma 1, (batch, 1)
    inv_total = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    f_mu = f_mu - row_sums * (f_mu.sum(-1, keepdim=True) * inv_total)
    outer = row_sums.unsqueeze(-1) * row_sums.unsqueeze(-2)
    return f_mu, f_var - outer * inv_total.unsqueeze(-1)


def _normalize_per_example(
    f_mu: torch.Tensor, f_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``'bridge_norm'``: scale each example's Gaussian so that its mean latent
    variance is ``sqrt(K / 2)``: ``m = mean_k(var_k) / sqrt(K / 2)``, then
    ``f_mu / sqrt(m)`` and ``f_var / m`` (rows with ``m = 0`` are kept)."""
    n_classes = f_mu.shape[-1]
    var_mean = f_var.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
    m = var_mean / math.sqrt(n_classes / 2.0)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return f_mu / m.sqrt(), f_var / m.unsqueeze(-1)


def bridge_probs(
    f_mu: torch.Tensor, f_var: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Laplace bridge (Hobbhahn et al., 2022): map the Gaussian, conditioned on
    ``sum(f) = 0``, to a Dirichlet ``alpha_k = (1 - 2/K + exp(mu_k)/K^2 *
    sum_l exp(-mu_l)) / Sigma_kk`` and return its mean ``alpha / sum(alpha)``.

    With ``normalize=True`` (``'bridge_norm'``) each example's Gaussian is first
    rescaled to the mean variance ``sqrt(K / 2)`` (see
    :func:`_normalize_per_example`), as laplace-torch does.

    Computed in log space, so large logits cannot overflow and every row sums
    to 1. A class with zero variance is certain: the row's mass goes to the
    zero-variance classes (in proportion to the numerators above, the limit of
    variances vanishing at the same rate).
    """
    n_classes = f_mu.shape[-1]
    if normalize:
        f_mu, f_var = _normalize_per_example(f_mu, f_var)
    f_mu, f_var = _sum_zero_projection(f_mu, f_var)
    var_diag = torch.diagonal(f_var, dim1=-2, dim2=-1)
    # log of exp(mu_k) / K^2 * sum_l exp(-mu_l)
    log_ratio = f_mu + torch.logsumexp(-f_mu, dim=-1, keepdim=True)
    log_ratio = log_ratio - 2.0 * math.log(n_classes)
    offset = 1.0 - 2.0 / n_classes  # 0 for K = 2: log 0 = -inf is fine below
    log_numerator = torch.logaddexp(
        torch.full_like(log_ratio, math.log(offset) if offset > 0 else -math.inf),
        log_ratio,
    )
    certain = var_diag <= 0
    any_certain = certain.any(-1, keepdim=True)
    log_alpha = (
        log_numerator - var_diag.clamp_min(torch.finfo(var_diag.dtype).tiny).log()
    )
    log_alpha = torch.where(
        any_certain,
        torch.where(certain, log_numerator, torch.full_like(log_alpha, -math.inf)),
        log_alpha,
    )
    return torch.softmax(log_alpha, dim=-1)


def mc_probs(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo average of the softmax over ``n_samples`` Gaussian logit draws."""
    samples = normal_samples(f_mu, f_var, n_samples, generator)
    return torch.softmax(samples, dim=-1).mean(0)


def glm_link(
    f_mu: torch.Tensor,
    f_var: torch.Tensor,
    link_approx: LinkApprox,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Class probabilities of the linearised (GLM) predictive.

    ``f_var`` may be the full ``(batch, K, K)`` covariance or, for the probit and MC
    links, just its diagonal ``(batch, K)``.
    """
    if link_approx is LinkApprox.PROBIT:
        diag = f_var if f_var.shape == f_mu.shape else f_var.diagonal(0, -2, -1)
        return probit_probs(f_mu, diag)
    if link_approx is LinkApprox.MC:
        return mc_probs(f_mu, f_var, n_samples, generator)
    if f_var.shape == f_mu.shape:
        f_var = torch.diag_embed(f_var)
    return bridge_probs(f_mu, f_var, normalize=link_approx is LinkApprox.BRIDGE_NORM)
