"""Square roots ``L`` of the loss Hessian w.r.t. the model outputs.

The GGN is ``sum_n J_n^T L_n L_n^T J_n``, so it only ever needs the columns
``J_n^T L_n[:, c]``.  Exact roots have ``n_outputs`` columns; Monte-Carlo
roots (the sampled Fisher) have one column per sample, scaled so that
``E[L L^T]`` is the exact Hessian:

* regression, loss ``0.5 ||f - y||^2``: ``Lambda = I``; sampled gradients
  ``f - y~`` with ``y~ ~ N(f, I)`` are standard normal.
* classification, cross-entropy: ``Lambda = diag(p) - p p^T``,
  ``L = diag(sqrt p) - p sqrt(p)^T``; sampled gradients are ``p - onehot(y~)``
  with ``y~ ~ Categorical(p)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from laplace.utils.enums import Likelihood

__all__ = ["exact_sqrt", "exact_sqrt_fn", "sampled_sqrt"]


def _regression_sqrt(f_n: Tensor) -> Tensor:
    return torch.eye(f_n.shape[-1], dtype=f_n.dtype, device=f_n.device)


def _classification_sqrt(f_n: Tensor) -> Tensor:
    p = torch.softmax(f_n, dim=-1)
    sqrt_p = p.sqrt()
    return torch.diag(sqrt_p) - torch.outer(p, sqrt_p)


def exact_sqrt_fn(likelihood: Likelihood) -> Callable[[Tensor], Tensor]:
    """Per-sample root ``f_n (n_outputs,) -> L_n (n_outputs, n_outputs)``.

    ``torch.func.vmap`` it for a batch.
    """
    if likelihood is Likelihood.REGRESSION:
        return _regression_sqrt
    return _classification_sqrt


def exact_sqrt(f: Tensor, likelihood: Likelihood) -> Tensor:
    """Roots of a batch, ``f (batch, n_outputs) -> L (batch, n_outputs,
    n_outputs)``: the batched :func:`exact_sqrt_fn` in closed form (no ``vmap``)."""
    n, C = f.shape
    if likelihood is Likelihood.REGRESSION:
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return eye.expand(n, C, C)
    p = torch.softmax(f, dim=-1)
    sqrt_p = p.sqrt()
    return torch.diag_embed(sqrt_p) - p.unsqueeze(-1) * sqrt_p.unsqueeze(-2)


def sampled_sqrt(
    f: Tensor,
    likelihood: Likelihood,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo root from ``num_samples`` labels drawn from the model.

    Parameters
    ----------
    f : Tensor
        Outputs `(batch, n_outputs)`.

    Returns
    -------
    Tensor
        `(batch, n_outputs, num_samples)`.
    """
    f = f.detach()
    shape = (f.shape[0], num_samples, f.shape[1])
    kw = {"dtype": f.dtype, "device": f.device, "generator": generator}
    if likelihood is Likelihood.REGRESSION:
        grads = torch.randn(shape, **kw)
    else:
        # Gumbel-max: argmax(log p + Gumbel noise) ~ Categorical(p).
        gumbel = -torch.log(-torch.log(torch.rand(shape, **kw)))
        logp = torch.log_softmax(f, dim=-1).unsqueeze(1)
        labels = (logp + gumbel).argmax(dim=-1)
        onehot = torch.nn.functional.one_hot(labels, f.shape[1]).to(f.dtype)
        grads = torch.softmax(f, dim=-1).unsqueeze(1) - onehot
    return grads.transpose(1, 2) / num_samples**0.5
