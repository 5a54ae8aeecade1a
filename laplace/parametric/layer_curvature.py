"""Exact GGN (diagonal, dense or KFAC) from per-layer factors (``nn.Linear`` and
``nn.Conv2d``).

With the loss-Hessian root ``L_n`` (``Lambda_n = L_n L_n^T``, columns ``c``), the
GGN diagonal is ``sum_{n, c} (J_n^T L_n[:, c])^2``. Backpropagating the seeds
``L[:, :, c]`` once gives every layer's output gradients ``G[n, c, t]``, and

- weight, one position: ``diag = sum_{n, c} G[n, c]^2 outer a[n]^2``, a single
  ``(out, batch) @ (batch, in)`` product,
- weight, several positions: the per-sample gradients ``sum_t outer(G[n, c, t],
  a[n, t])`` squared and summed, a chunk of rows at a time,
- bias: ``sum_{n, c} (sum_t G[n, c, t])^2``,

so no per-sample gradient of the whole network is ever formed. The dense GGN of
single-position layers sums Kronecker products per sample
(:mod:`laplace.parametric.dense_ggn_factors`); KFAC sums ``G`` over one chunk of
seeds at a time. A bare ``nn.Linear`` (the last layer of last-layer Laplace, on
its features) needs no autograd at all and no roots either
(:mod:`laplace.parametric.last_layer_ggn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from laplace.curvature._loss_sqrt import exact_sqrt
from laplace.curvature.curvature import GGNInterface
from laplace.curvature.curvlinops import CurvlinopsInterface
from laplace.parametric.dense_ggn_factors import (
    full_ggn_from_products,
    single_position,
)
from laplace.parametric.last_layer_ggn import linear_layer_ggn
from laplace.parametric.layer_factors import (
    LayerFactors,
    forward_with_factors,
    iter_gradients,
    layer_jacobian,
    layer_plan,
    set_gradients,
)
from laplace.utils.data import batch_size
from laplace.utils.matrix import Kron

__all__ = [
    "diag_ggn_by_layers",
    "full_ggn_by_layers",
    "kron_ggn_by_layers",
    "exact_ggn_closure",
]


def _weight_diag(a: Tensor, g: Tensor, budget: int) -> Tensor:
    """``(out, in)`` diagonal from ``a (batch, T, in)`` and ``g (batch, C, T, out)``."""
    if a.shape[1] == 1:
        return g[:, :, 0].square().sum(1).mT @ a[:, 0].square()
    per_row = g.shape[1] * g.shape[3] * a.shape[2]
    rows = max(1, budget // per_row)
    total = 0
    for a_c, g_c in zip(a.split(rows), g.split(rows)):
        total = total + torch.einsum("bctk,btl->bckl", g_c, a_c).square().sum((0, 1))
    return total


_GRAM_ELEMENTS = 2**22  # bound on the per-sample products summed by _gram


def _gram(x: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``scale * sum x_r x_r^T`` over all rows ``x_r`` of ``x (..., T, d)``,
    ``(d, d)``."""
    d = x.shape[-1]
    if x.stride(-1) == 1 or x.shape[-2] == 1:
        rows = x.reshape(-1, d).to(dtype)
        # the scale rides along in the product (beta=0 ignores the empty input)
        return torch.addmm(rows.new_empty(d, d), rows.mT, rows, beta=0, alpha=scale)
    # Convolution gradients and patches keep the positions innermost, (..., d, T):
    # per-sample products read them in place, gathering rows of d would not.
    cols = x.transpose(-1, -2).reshape(-1, d, x.shape[-2]).to(dtype)
    step = max(1, _GRAM_ELEMENTS // (d * d))
    return sum(torch.bmm(c, c.mT).sum(0) for c in cols.split(step)) * scale


def _seeded_forward(
    model: nn.Module,
    params: list[Tensor],
    x: Tensor | MutableMapping,
    roots_fn: Callable[[Tensor], Tensor],
    dict_key_x: str,
    chunked: bool = False,
) -> tuple[Tensor, list[LayerFactors], Iterator[None]] | None:
    """Outputs, layer factors and an iterator that sets ``g`` to the gradients
    of the loss-root seeds ``(batch, C, T, out)`` (with ``chunked``, of one chunk
    of seeds per step); ``None`` for unsupported networks."""
    plan = layer_plan(model, params)
    if plan is None:
        return None
    n = batch_size(x, dict_key_x)
    f = forward_with_factors(model, plan, x, n, keep_graph=False)
    if f is None:
        return None
    seeds = roots_fn(f.detach()).permute(2, 0, 1)  # (C, batch, n_outputs)
    if chunked:
        return f.detach(), plan, iter_gradients(f, plan, seeds, keep_graph=False)
    set_gradients(f, plan, seeds, keep_graph=False)
    return f.detach(), plan, iter([None])


def _seeded_factors(
    model: nn.Module,
    params: list[Tensor],
    x: Tensor | MutableMapping,
    roots_fn: Callable[[Tensor], Tensor],
    dict_key_x: str,
) -> tuple[Tensor, list[LayerFactors]] | None:
    """Outputs and layer factors with ``g`` the gradients of all loss-root seeds
    ``(batch, C, T, out)``; ``None`` for unsupported networks."""
    found = _seeded_forward(model, params, x, roots_fn, dict_key_x)
    return None if found is None else found[:2]


def diag_ggn_by_layers(
    model: nn.Module,
    params: list[Tensor],
    x: Tensor | MutableMapping,
    roots_fn: Callable[[Tensor], Tensor],
    budget: int,
    dtype: torch.dtype,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor] | None:
    """Outputs ``(batch, n_outputs)`` and the GGN diagonal ``(n_params,)`` of the
    batch ``x``, or ``None`` when a treated parameter is outside a supported layer.

    ``roots_fn`` maps outputs ``(batch, n_outputs)`` to the loss-Hessian roots
    ``(batch, n_outputs, n_columns)``.
    """
    found = _seeded_factors(model, params, x, roots_fn, dict_key_x)
    if found is None:
        return None
    f, plan = found
    diag: list[Tensor | None] = [None] * len(params)
    for layer in plan:
        g = layer.g.detach().to(dtype)
        if layer.weight is not None:
            d = _weight_diag(layer.a.to(dtype), g, budget)
            diag[layer.weight] = d.flatten()
        if layer.bias is not None:
            diag[layer.bias] = g.sum(2).square().sum((0, 1))
        layer.a = layer.s = layer.g = None
    return f, torch.cat(diag)


def full_ggn_by_layers(
    model: nn.Module,
    params: list[Tensor],
    x: Tensor | MutableMapping,
    roots_fn: Callable[[Tensor], Tensor],
    budget: int,
    dtype: torch.dtype,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor] | None:
    """Outputs ``(batch, n_outputs)`` and the dense GGN ``(n_params, n_params)``
    ``M^T M`` with rows ``M[(n, c)] = J_n^T L_n[:, c]`` assembled from the layer
    factors, a chunk of rows at a time; ``None`` for unsupported networks."""
    found = _seeded_factors(model, params, x, roots_fn, dict_key_x)
    if found is None:
        return None
    f, plan = found
    n, C = f.shape[0], plan[0].g.shape[1]
    sizes = [p.numel() for p in params]
    if C > 1 and single_position(plan):
        H = full_ggn_from_products(plan, sizes, dtype, budget)
        for layer in plan:
            layer.a = layer.s = layer.g = None
        return f, H
    P = sum(sizes)
    rows = max(1, budget // (C * P))
    H = f.new_zeros(P, P, dtype=dtype)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        chunk = [
            LayerFactors(
                layer.module, layer.weight, layer.bias, a=layer.a[sl], g=layer.g[sl]
            )
            for layer in plan
        ]
        M = layer_jacobian(chunk, P, dtype).flatten(0, 1)
        H = H + M.mT @ M
    for layer in plan:
        layer.a = layer.s = layer.g = None
    return f, H


def kron_ggn_by_layers(
    model: nn.Module,
    params: list[Tensor],
    x: Tensor | MutableMapping,
    roots_fn: Callable[[Tensor], Tensor],
    N: int,
    dtype: torch.dtype,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Kron] | None:
    """Outputs and the type-2 KFAC of the batch in the convention of the default
    backend ('expand'): per weight ``G = sum_{n, c, t} g g^T`` and ``A = sum_{n,
    t} a a^T / (N T)``, per bias ``G``; ``None`` for unsupported networks."""
    found = _seeded_forward(model, params, x, roots_fn, dict_key_x, chunked=True)
    if found is None:
        return None
    f, plan, chunks = found
    # G summed over chunks of seeds: the seed gradients are never held at once
    Gs: list[Tensor | int] = [0] * len(plan)
    for _ in chunks:
        for i, layer in enumerate(plan):
            Gs[i] = Gs[i] + _gram(layer.g.detach(), dtype)
    blocks: list[list[Tensor] | None] = [None] * len(params)
    for layer, G in zip(plan, Gs):
        if layer.weight is not None:
            T = layer.a.shape[1]
            blocks[layer.weight] = [G, _gram(layer.a.detach(), dtype, 1 / (N * T))]
        if layer.bias is not None:
            blocks[layer.bias] = [G]
        layer.a = layer.s = layer.g = None
    return f, Kron(blocks)


def exact_ggn_closure(
    la: Any, X: Any, y: Tensor, method: str, N: int = 0
) -> tuple[Tensor, Any] | None:
    """Loss ``()`` and exact GGN of a batch from layer factors (``method`` 'diag'
    ``(P,)``, 'full' ``(P, P)`` or 'kron' :class:`Kron` for a data set of size
    ``N``), when ``la``'s backend asks for that exact GGN and the network is
    supported; ``None`` otherwise.

    It reproduces the backend's generic route (not stochastic, not a subnetwork,
    not a backend-specific implementation), only faster.
    """
    backend = la.backend
    generic = {getattr(CurvlinopsInterface, method)}
    if method != "kron":  # GGNInterface has no KFAC: keep its error
        generic.add(getattr(GGNInterface, method))
    subset = la._key[0] if la._key else None
    applies = (
        subset in ("all", "last_layer")
        and backend.last_layer == (subset == "last_layer")
        and isinstance(backend, GGNInterface)
        and getattr(type(backend), method) in generic
        and not backend.stochastic
        and backend.subnetwork_indices is None
        and getattr(backend, "kfac_approx", "expand") == "expand"
    )
    if not applies:
        return None
    # a last-layer backend sees the features as inputs of the last layer
    module = la.model.last_layer if backend.last_layer else la.model
    if type(module) is nn.Linear and isinstance(X, Tensor) and X.ndim == 2:
        # a bare linear layer: closed form in the loss Hessian, no roots
        f, H = linear_layer_ggn(
            module,
            la.params,
            X,
            la.likelihood,
            method,
            N,
            la.glm_chunk_elements,
            la._dtype,
        )
        return (backend.factor * backend.lossfunc(f, y)).detach(), H
    route = {
        "diag": diag_ggn_by_layers,
        "full": full_ggn_by_layers,
        "kron": kron_ggn_by_layers,
    }[method]
    size = N if method == "kron" else la.glm_chunk_elements
    roots_fn = partial(exact_sqrt, likelihood=la.likelihood)
    found = route(module, la.params, X, roots_fn, size, la._dtype, la.dict_key_x)
    if found is None:
        return None
    f, H = found
    return (backend.factor * backend.lossfunc(f, y)).detach(), H
