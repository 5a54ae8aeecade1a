"""GLM predictive variances ``J Sigma J^T`` without the ``(batch, n_outputs,
n_params)`` Jacobian.

Each parameter tensor's posterior covariance is a :class:`Block` in an eigenbasis,
``Sigma = kron(Q_out, Q_in) diag(inv) kron(Q_out, Q_in)^T`` (Kron: the factors'
eigenvectors and reciprocal eigenvalues; Diag: identity bases and the variances).
With the layer factors of :mod:`laplace.parametric.layer_factors` (inputs ``a``,
output gradients ``g``) and rotated factors ``aQ = a Q_in``, ``gQ = g Q_out``:

- one position per sample: ``w[n, k] = sum_l aQ[n, l]^2 inv[k, l]`` and
  ``var[n] = gQ[n] diag(w[n]) gQ[n]^T``; for a last layer ``g`` is the identity, so
  ``var[n] = Q_out diag(w[n]) Q_out^T``;
- several positions (convolutions, sequences): ``R[n, o] = sum_t outer(gQ[n, o,
  t], aQ[n, t])`` is the layer's Jacobian in the eigenbasis and ``var[n] =
  R[n] diag(inv) R[n]^T``, built one chunk of rows at a time.

All results equal the Jacobian route up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from laplace.parametric.layer_factors import (
    LayerFactors,
    forward_with_factors,
    layer_jacobian,
    layer_plan,
    output_gradients,
)
from laplace.structures.blocks import Block
from laplace.utils.data import batch_size, select_rows

__all__ = [
    "identity_output_variance",
    "block_variance",
    "dense_variance",
    "per_layer_glm",
    "full_last_layer_variance",
    "readout_variance",
    "row_chunks",
]


# ---- square forms --------------------------------------------------------------------
def _rotate(X: Tensor, Q: Tensor | None) -> Tensor:
    return X if Q is None else X @ Q


def _scaled_form(X: Tensor, w: Tensor, diagonal: bool) -> Tensor:
    """``X diag(w) X^T`` per row: ``X (batch, O, K)``, ``w (batch, K)`` or ``(K,)``."""
    w = w.unsqueeze(-2) if w.ndim == 2 else w
    if diagonal:
        return (X.square() * w).sum(-1)
    return (X * w) @ X.mT


def identity_output_variance(Q: Tensor | None, w: Tensor, diagonal: bool) -> Tensor:
    """``Q diag(w[n]) Q^T`` for ``w (batch, K)``: ``(batch, K, K)`` or its diagonal."""
    if Q is None:
        return w if diagonal else torch.diag_embed(w)
    if diagonal:
        return w @ Q.square().mT
    return (Q * w.unsqueeze(-2)) @ Q.mT


def weight_variance(
    block: Block, a: Tensor, g: Tensor | None, diagonal: bool
) -> Tensor:
    """Variance contribution of a weight; ``a (batch, T, in)``, ``g (batch, O, T,
    out)`` or ``None`` for the identity (last layer, ``T == 1``)."""
    if g is None or a.shape[1] == 1:
        w = _rotate(a[:, 0], block.in_basis).square() @ block.inv.mT
        if g is None:
            return identity_output_variance(block.out_basis, w, diagonal)
        return _scaled_form(_rotate(g[:, :, 0], block.out_basis), w, diagonal)
    # contract the positions first (the layer Jacobian), then rotate it: rotating
    # g and a would cost a factor T more
    R = torch.einsum("botk,btl->bokl", g, a)
    if block.out_basis is not None:
        R = block.out_basis.mT @ R
    if block.in_basis is not None:
        R = R @ block.in_basis
    return _scaled_form(R.flatten(2), block.inv.flatten(), diagonal)


def bias_variance(block: Block, g: Tensor, diagonal: bool) -> Tensor:
    """Variance contribution of a bias; ``g (batch, O, T, out)``."""
    return _scaled_form(_rotate(g.sum(2), block.out_basis), block.inv, diagonal)


# ---- chunking ----------------------------------------------------------------------
def row_chunks(x: Tensor | MutableMapping, rows: int, dict_key_x: str):
    """Yield consecutive chunks of at most ``rows`` rows of ``x``."""
    n = batch_size(x, dict_key_x)
    if rows >= n:
        yield x
        return
    for start in range(0, n, rows):
        yield select_rows(x, slice(start, start + rows), n)


def _probe_sizes(plan, model, x, dict_key_x) -> tuple[int, int, int]:
    """Per sample and output: elements of all layer outputs, and of the largest
    multi-position layer Jacobian (0 if none); and the number of outputs of the
    network on these inputs. ``(-1, -1, -1)`` when the plan does not apply."""
    first = select_rows(x, slice(0, 1), batch_size(x, dict_key_x))
    f = forward_with_factors(model, plan, first, 1, keep_graph=False)
    if f is None:
        return -1, -1, -1
    outputs = sum(layer.s.numel() for layer in plan)
    # a multi-position layer holds its Jacobian (out * in per output) in the basis
    jac = max(
        (
            layer.a.shape[2] * layer.s.numel() // layer.a.shape[1]
            for layer in plan
            if layer.a.shape[1] > 1
        ),
        default=0,
    )
    for layer in plan:
        layer.a = layer.s = None
    return outputs, jac, int(f.shape[1])


Variance = Callable[[list[LayerFactors], bool], Tensor]


def block_variance(blocks: list[Block], dtype: torch.dtype) -> Variance:
    """Variance from the layer factors for a posterior of :class:`Block` s."""

    def variance(plan: list[LayerFactors], diagonal: bool) -> Tensor:
        var = 0
        for layer in plan:
            g = layer.g.to(dtype)
            if layer.weight is not None:
                a = layer.a.to(dtype)
                var = var + weight_variance(blocks[layer.weight], a, g, diagonal)
            if layer.bias is not None:
                var = var + bias_variance(blocks[layer.bias], g, diagonal)
        return var

    return variance


def dense_variance(
    square_form: Callable[[Tensor, bool], Tensor], n_params: int, dtype: torch.dtype
) -> Variance:
    """Variance ``square_form(J, diagonal)`` of the Jacobian assembled from the
    layer factors, for posteriors without per-layer structure."""

    def variance(plan: list[LayerFactors], diagonal: bool) -> Tensor:
        return square_form(layer_jacobian(plan, n_params, dtype), diagonal)

    return variance


def per_layer_glm(
    model: nn.Module,
    params: list[Tensor],
    variance: Variance,
    x: Tensor | MutableMapping,
    diagonal: bool,
    keep_graph: bool,
    budget: int,
    dict_key_x: str = "input_ids",
    per_output_extra: int = 0,
) -> tuple[Tensor, Tensor] | None:
    """Outputs ``(batch, O)`` and GLM variances ``(batch, O, O)`` (or ``(batch, O)``
    with ``diagonal``) from per-layer factors; ``None`` when the network has a
    treated parameter outside a supported layer, so the caller falls back to
    Jacobians. ``O`` is the width of the network's output on ``x`` (which may
    differ from the fit's, e.g. reward models on pairs).

    ``budget`` bounds the elements held at once (output gradients, and
    ``per_output_extra`` more per sample and output, e.g. a Jacobian row): rows
    are processed in chunks and, for ``diagonal``, outputs too. The outputs are
    those of one forward pass over the whole batch, as ``model(x)`` gives them,
    also when the variances were computed in chunks of rows.
    """
    plan = layer_plan(model, params)
    if plan is None:
        return None
    per_output, jac, n_outputs = _probe_sizes(plan, model, x, dict_key_x)
    if per_output < 0:
        return None
    per_row = per_output + jac + per_output_extra
    n = batch_size(x, dict_key_x)
    if diagonal:
        rows = max(1, min(n, budget // per_row))
        out_chunk = max(1, min(n_outputs, budget // (rows * per_row)))
    else:
        rows = max(1, min(n, budget // (per_row * n_outputs)))
        out_chunk = n_outputs
    f_all, var_all = [], []
    for xc in row_chunks(x, rows, dict_key_x):
        m = batch_size(xc, dict_key_x)
        f = forward_with_factors(model, plan, xc, m, keep_graph)
        if f is None:
            return None
        parts = [
            variance(plan, diagonal)
            for _ in output_gradients(f, plan, out_chunk, keep_graph)
        ]
        for layer in plan:
            layer.a = layer.s = layer.g = None
        f_all.append(f if keep_graph else f.detach())
        var_all.append(torch.cat(parts, dim=1) if diagonal else parts[0])
    var = torch.cat(var_all)
    if len(f_all) == 1:
        return f_all[0], var if keep_graph else var.detach()
    # outputs of row chunks can differ from one pass over the batch in the last
    # bits (other matmul blocking): the mean is the network's output
    with torch.set_grad_enabled(keep_graph):
        f = model(x)
    return f, var if keep_graph else var.detach()


# ---- a linear readout of fixed features (last layer) ----------------------------------
def readout_variance(
    precision: Any,
    params: list[Tensor],
    layer: nn.Linear,
    phi: Tensor,
    n_outputs: int,
    diagonal: bool,
    budget: int,
) -> Tensor:
    """GLM variance of ``f = W phi + b`` (the treated ``params`` of ``layer``)
    from features ``phi (batch, D)``: ``(batch, O, O)``, or ``(batch, O)`` with
    ``diagonal``. With covariance blocks per parameter tensor (Kron, diagonal)
    ``J_n`` is the identity kron ``phi_n``, so each block only needs ``phi``
    rotated into its input basis; a dense covariance is contracted with ``phi``
    block by block, rows chunked to bound the ``(rows, O, O, D)`` intermediate."""
    blocks = precision.layer_blocks(params)
    if blocks is not None:
        var = 0
        for param, block in zip(params, blocks):
            if param.ndim >= 2:
                var = var + weight_variance(block, phi.unsqueeze(1), None, diagonal)
            else:
                w = block.inv.expand(len(phi), -1)
                var = var + identity_output_variance(block.out_basis, w, diagonal)
        return var
    has_weight = any(p is layer.weight for p in params)
    has_bias = layer.bias is not None and any(p is layer.bias for p in params)
    rows = max(1, budget // (n_outputs * n_outputs * phi.shape[1]))
    cov = precision.covariance()
    return torch.cat(
        [
            full_last_layer_variance(
                chunk, cov, n_outputs, has_weight, has_bias, diagonal
            )
            for chunk in phi.split(rows)
        ]
    )


def full_last_layer_variance(
    phi: Tensor,
    cov: Tensor,
    n_outputs: int,
    has_weight: bool,
    has_bias: bool,
    diagonal: bool,
) -> Tensor:
    """GLM variance of a linear last layer ``f = W phi + b`` under a dense
    covariance ``cov`` over ``[W.flatten(), b]``, from the covariance blocks and
    the features ``phi (batch, D)``: ``(batch, O, O)`` or ``(batch, O)``."""
    n, D = phi.shape
    OD = n_outputs * D if has_weight else 0
    var = phi.new_zeros((n, n_outputs) if diagonal else (n, n_outputs, n_outputs))
    # plain matmuls: a three-operand einsum re-plans its contraction every call
    if has_weight:
        Sww = cov[:OD, :OD].reshape(n_outputs, D, n_outputs, D)
        if diagonal:
            own = torch.diagonal(Sww, dim1=0, dim2=2).permute(2, 0, 1)  # (O, D, D)
            var = var + ((phi @ own) * phi).sum(-1).mT
        else:
            left = phi @ Sww.permute(1, 0, 2, 3).reshape(D, -1)  # (batch, O*O*D)
            left = left.reshape(n, n_outputs, n_outputs, D)
            var = var + (left * phi[:, None, None, :]).sum(-1)
    if has_bias:
        Sbb = cov[OD:, OD:]
        var = var + (Sbb.diagonal() if diagonal else Sbb)
        if has_weight:
            Swb = cov[:OD, OD:].reshape(n_outputs, D, n_outputs)
            cross = (phi @ Swb.permute(1, 0, 2).reshape(D, -1)).reshape(
                n, n_outputs, n_outputs
            )
            if diagonal:
                var = var + 2 * cross.diagonal(dim1=1, dim2=2)
            else:
                var = var + cross + cross.mT
    return var
