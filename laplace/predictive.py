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
    and is the form the Laplace bridge assumes (Hobbhahn et al., 2022, Sec. 3)."""
    row_sums = f_var.sum(-1)  # Sigma 1, (batch, K)
    total = row_sums.sum(-1, keepdim=True)  # 1^T Sigma 1, (batch, 1)
    f_mu = f_mu - row_sums * f_mu.sum(-1, keepdim=True) / total
    f_var = f_var - row_sums.unsqueeze(-1) * row_sums.unsqueeze(-2) / total.unsqueeze(
        -1
    )
    return f_mu, f_var


def bridge_probs(
    f_mu: torch.Tensor, f_var: torch.Tensor, normalize: bool = False
) -> torch.Tensor:
    """Laplace bridge (Hobbhahn et al., 2022): map the Gaussian to a Dirichlet
    ``alpha_k = (1 - 2/K + exp(mu_k)/K^2 * sum_l exp(-mu_l)) / Sigma_kk`` and return
    its mean ``alpha / sum(alpha)``.

    With ``normalize=True`` (``'bridge_norm'``) every class gets the same variance,
    the average one rescaled by ``sqrt(K / 2)``, and the means are rescaled by the
    same per-class factor; this removes the over-confidence the plain bridge shows
    for classes with very different variances.
    """
    n_classes = f_mu.shape[-1]
    f_mu, f_var = _sum_zero_projection(f_mu, f_var)
    var_diag = torch.diagonal(f_var, dim1=-2, dim2=-1)
    if normalize:
        var_mean = var_diag.mean(-1, keepdim=True) / math.sqrt(n_classes / 2.0)
        f_mu = f_mu * (var_mean / var_diag).sqrt()
        var_diag = var_mean.expand_as(var_diag)
    sum_exp = torch.exp(-f_mu).sum(-1, keepdim=True)
    alpha = (1.0 - 2.0 / n_classes + f_mu.exp() / n_classes**2 * sum_exp) / var_diag
    probs = alpha / alpha.sum(-1, keepdim=True)
    # Zero variance (a class the posterior is certain about) gives 0/0 above.
    return torch.nan_to_num(probs, nan=1.0 / n_classes)


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
