"""Exact GGN of a last ``nn.Linear`` layer from its features, without roots.

For ``f_n = W a_n + b`` the Jacobian is ``J_n = I kron a~_n^T`` with ``a~_n =
[a_n, 1]`` (the ``1`` for the bias), so the GGN is

    H = sum_n Lambda_n kron (a~_n a~_n^T).

The loss Hessians of both likelihoods are a diagonal minus a rank one,
``Lambda_n = diag(d_n) - v_n v_n^T``: ``d = p, v = p`` for the softmax
cross-entropy (``p`` the class probabilities), ``d = 1, v = 0`` for ``0.5 *
squared error``. Hence

- full: ``H = blockdiag_o(sum_n d_n[o] a~_n a~_n^T) - M^T M`` with rows ``M_n =
  v_n kron a~_n`` (``(n_params,)``), in ``O(N P^2)`` time and ``O(P^2 + batch
  P)`` memory; the ``(C, C)`` roots per sample, and the ``C^2 D^2`` per-sample
  Kronecker products, are never formed,
- diagonal: ``diag H = (d - v^2)^T (a~^2)``,
- KFAC: ``G = sum_n Lambda_n = diag(sum_n d_n) - V^T V`` and ``A = sum_n a_n
  a_n^T / N``.

Parameters are ordered as the layer's: the weight ``(C, D)`` row-major, then the
bias ``(C,)``, each only if treated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

__all__ = [
    "hessian_parts",
    "last_layer_full_ggn",
    "last_layer_diag_ggn",
    "last_layer_kron_ggn",
    "linear_layer_ggn",
]


def hessian_parts(f: Tensor, likelihood: Likelihood) -> tuple[Tensor, Tensor | None]:
    """``d (N, C)`` and ``v (N, C)`` (``None`` for regression) with ``Lambda_n =
    diag(d_n) - v_n v_n^T`` the loss Hessian at the outputs ``f (N, C)``."""
    if likelihood is Likelihood.REGRESSION:
        return torch.ones_like(f), None
    p = torch.softmax(f, dim=-1)
    return p, p


def _augmented(a: Tensor, weight: bool, bias: bool) -> Tensor:
    """``(N, D~)``: the features if the weight is treated, then a column of ones
    if the bias is."""
    cols = [a] if weight else []
    if bias:
        cols.append(a.new_ones(len(a), 1))
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


def last_layer_full_ggn(
    a: Tensor,
    d: Tensor,
    v: Tensor | None,
    weight: bool,
    bias: bool,
    budget: int,
) -> Tensor:
    """Dense GGN ``(P, P)`` of a last linear layer (see module docs).

    Parameters
    ----------
    a : Tensor
        Features ``(N, D)``, in the dtype of the result.
    d, v : Tensor
        Loss-Hessian parts ``(N, C)`` from :func:`hessian_parts`.
    weight, bias : bool
        Which of the layer's parameters are treated.
    budget : int
        Bound on the entries of the ``(rows, P)`` chunks of ``M``.
    """
    N, C = d.shape
    D = a.shape[1]
    d = d.to(a.dtype)
    n_w = C * D if weight else 0
    P = n_w + (C if bias else 0)
    H = a.new_zeros(P, P)
    # diagonal part: one (D, D) block per output o on the diagonal of each pair
    # of parameter groups; viewing H in (o, i, o', j) layout keeps it in place
    if weight:
        block = torch.einsum("no,ni,nj->ijo", d, a, a)  # (D, D, C)
        H[:n_w, :n_w].view(C, D, C, D).diagonal(dim1=0, dim2=2).add_(block)
    if bias:
        H[n_w:, n_w:].diagonal().add_(d.sum(0))
    if weight and bias:
        cross = (d.mT @ a).mT  # (D, C): sum_n d_n[o] a_n[i]
        H[:n_w, n_w:].view(C, D, C).diagonal(dim1=0, dim2=2).add_(cross)
        H[n_w:, :n_w].view(C, C, D).diagonal(dim1=0, dim2=1).add_(cross)
    if v is None:
        return H
    # rank-one part, M_n = v_n kron a~_n in the parameter order, a chunk of rows
    # at a time: the update stays in place
    v = v.to(a.dtype)
    rows = max(1, budget // P)
    for start in range(0, N, rows):
        v_c, a_c = v[start : start + rows], a[start : start + rows]
        cols = [(v_c.unsqueeze(2) * a_c.unsqueeze(1)).flatten(1)] if weight else []
        if bias:
            cols.append(v_c)
        M = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        H.addmm_(M.mT, M, alpha=-1)
    return H


def last_layer_diag_ggn(
    a: Tensor, d: Tensor, v: Tensor | None, weight: bool, bias: bool
) -> Tensor:
    """GGN diagonal ``(P,)`` of a last linear layer: ``diag(Lambda_n)[o]
    a~_n[i]^2`` summed over ``n``."""
    lam = d.to(a.dtype) if v is None else (d - v.square()).to(a.dtype)
    parts = [(lam.mT @ a.square()).flatten()] if weight else []
    if bias:
        parts.append(lam.sum(0))
    return torch.cat(parts)


def last_layer_kron_ggn(
    a: Tensor, d: Tensor, v: Tensor | None, weight: bool, bias: bool, N: int
) -> Kron:
    """KFAC of a last linear layer for a data set of size ``N``: per weight ``[G,
    A]`` with ``G = sum_n Lambda_n`` and ``A = sum_n a_n a_n^T / N``, per bias
    ``[G]``."""
    G = torch.diag(d.to(a.dtype).sum(0))
    if v is not None:
        v = v.to(a.dtype)
        G = G - v.mT @ v
    blocks = [[G, a.mT @ a / N]] if weight else []
    if bias:
        blocks.append([G.clone()] if weight else [G])
    return Kron(blocks)


def linear_layer_ggn(
    layer: nn.Linear,
    params: list[Tensor],
    x: Tensor,
    likelihood: Likelihood,
    method: str,
    N: int,
    budget: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor | Kron]:
    """Outputs ``(N, C)`` of ``layer`` on ``x (N, D)`` and the exact GGN of its
    treated ``params`` (``method`` 'full' ``(P, P)``, 'diag' ``(P,)`` or 'kron'
    for a data set of size ``N``)."""
    with torch.no_grad():
        f = layer(x)
    treated = {id(p) for p in params}
    weight = id(layer.weight) in treated
    bias = layer.bias is not None and id(layer.bias) in treated
    a = x.detach().to(dtype)
    d, v = hessian_parts(f.detach().to(dtype), likelihood)
    if method == "full":
        return f, last_layer_full_ggn(a, d, v, weight, bias, budget)
    if method == "diag":
        return f, last_layer_diag_ggn(a, d, v, weight, bias)
    return f, last_layer_kron_ggn(a, d, v, weight, bias, N)
