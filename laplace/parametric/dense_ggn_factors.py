"""Dense GGN of single-position layers from per-sample Kronecker products.

For layers with one position (``T = 1``: plain ``nn.Linear`` on ``(batch, in)``
inputs) the GGN column of seed ``c`` is ``g[n, c] kron a~[n]`` per layer, with
``a~ = [a, 1]`` (the ``1`` for the bias). Summing over the seeds first,

    H[l, m] = sum_n Gamma[n] kron (a~_l[n] a~_m[n]^T),
    Gamma[n] = sum_c g_l[n, c] g_m[n, c]^T,

one ``(out_l out_m, batch) @ (batch, in_l in_m)`` product per pair of layers:
``n_outputs`` times fewer operations than ``M^T M`` with the ``(batch *
n_outputs, n_params)`` Jacobian ``M``. For a last layer ``Gamma[n]`` is the loss
Hessian ``Lambda_n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplace.parametric.layer_factors import LayerFactors

__all__ = ["single_position", "full_ggn_from_products"]


def single_position(plan: list[LayerFactors]) -> bool:
    """Whether every layer of ``plan`` has one position (``a`` is
    ``(batch, 1, in)``)."""
    return all(layer.a.shape[1] == 1 for layer in plan)


def _augmented_inputs(layer: LayerFactors, dtype: torch.dtype) -> Tensor:
    """``(batch, in~)``: the inputs if the weight is treated, then a column of
    ones if the bias is."""
    a = layer.a[:, 0].to(dtype)
    cols = [a] if layer.weight is not None else []
    if layer.bias is not None:
        cols.append(a.new_ones(len(a), 1))
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


def _parts(layer: LayerFactors, offsets: list[int]) -> list[tuple[slice, slice]]:
    """Per treated parameter of the layer: its rows among all treated parameters
    and its columns ``i`` of the augmented inputs (weight ``W[o, i]`` for ``i <
    in``, bias ``b[o]`` the last column)."""
    n_out, n_in = layer.g.shape[-1], layer.a.shape[-1]
    parts = []
    if layer.weight is not None:
        start = offsets[layer.weight]
        parts.append((slice(start, start + n_out * n_in), slice(0, n_in)))
    if layer.bias is not None:
        start = offsets[layer.bias]
        width = n_in if layer.weight is not None else 0
        parts.append((slice(start, start + n_out), slice(width, width + 1)))
    return parts


def _seed_products(g_l: Tensor, g_m: Tensor, same: bool) -> tuple[Tensor, Tensor]:
    """``Gamma (batch, k)`` over the ``k`` distinct pairs ``(o, p)`` and the index
    ``(out_l * out_m,)`` of every pair ``(o, p)`` among them: for one layer
    ``Gamma`` is symmetric, so only ``o <= p`` is computed."""
    out_l, out_m = g_l.shape[-1], g_m.shape[-1]
    if not same:
        gamma = torch.einsum("nco,ncp->nop", g_l, g_m).flatten(1)
        return gamma, torch.arange(out_l * out_m, device=g_l.device)
    o, p = torch.triu_indices(out_l, out_l, device=g_l.device)
    gamma = (g_l[:, :, o] * g_l[:, :, p]).sum(1)
    pair = torch.empty(out_l, out_l, dtype=torch.long, device=g_l.device)
    pair[o, p] = pair[p, o] = torch.arange(len(o), device=g_l.device)
    return gamma, pair.flatten()


def _weighted_outer_sum(gamma: Tensor, a_l: Tensor, a_m: Tensor) -> Tensor:
    """``sum_n gamma[n, k] outer(a_l[n], a_m[n])`` as ``(k, in_l * in_m)``, through
    the smaller intermediate: ``gamma``-scaled ``a_l`` ``(k, batch, in_l)`` or the
    outer products ``(batch, in_l * in_m)``."""
    k, in_l, in_m = gamma.shape[1], a_l.shape[1], a_m.shape[1]
    if k <= in_m:
        scaled = gamma.mT.unsqueeze(2) * a_l.unsqueeze(0)
        return (scaled.mT @ a_m).view(k, in_l * in_m)
    outer = (a_l.unsqueeze(2) * a_m.unsqueeze(1)).flatten(1)
    return gamma.mT @ outer


def full_ggn_from_products(
    plan: list[LayerFactors], sizes: list[int], dtype: torch.dtype, budget: int
) -> Tensor:
    """Dense GGN ``(n_params, n_params)`` of single-position layers (see module
    docs), in the order of the treated parameters.

    Parameters
    ----------
    plan : list of LayerFactors
        With inputs ``a (batch, 1, in)`` and seed gradients ``g (batch, C, 1,
        out)``.
    sizes : list of int
        Number of entries of every treated parameter, in order.
    budget : int
        Bound on the entries of the per-chunk ``(rows, in_l in_m)`` products.
    """
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    a = [_augmented_inputs(layer, dtype) for layer in plan]
    g = [layer.g[:, :, 0].to(dtype) for layer in plan]
    parts = [_parts(layer, offsets) for layer in plan]
    H = g[0].new_empty(sum(sizes), sum(sizes))
    n = len(a[0])
    for l in range(len(plan)):
        for m in range(l, len(plan)):
            out_l, out_m = g[l].shape[-1], g[m].shape[-1]
            in_l, in_m = a[l].shape[1], a[m].shape[1]
            rows = max(1, budget // max(in_l * in_m, out_l * out_m))
            block = None
            for start in range(0, n, rows):
                sl = slice(start, start + rows)
                gamma, pair = _seed_products(g[l][sl], g[m][sl], l == m)
                part = _weighted_outer_sum(gamma, a[l][sl], a[m][sl])
                block = part if block is None else block.add_(part)
            # rows (o, p), columns (i, j) -> (o, i, p, j)
            block = block.index_select(0, pair).view(out_l, out_m, in_l, in_m)
            block = block.permute(0, 2, 1, 3)
            for rows_l, cols_l in parts[l]:
                for rows_m, cols_m in parts[m]:
                    target = H[rows_l, rows_m]
                    sub = block[:, cols_l, :, cols_m]
                    target.view(sub.shape).copy_(sub)
                    if m != l:
                        H[rows_m, rows_l].copy_(target.mT)
    return H
