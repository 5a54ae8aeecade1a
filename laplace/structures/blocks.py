"""Covariance blocks per parameter tensor, in eigenbases: what the fast GLM
predictive (:mod:`laplace.parametric.fast_glm`) contracts with layer factors
instead of forming Jacobians. Kronecker-factored and diagonal posteriors are
block-diagonal over the parameter tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from laplace.utils.matrix import KronDecomposed

__all__ = ["Block", "kron_blocks", "diag_blocks"]


@dataclass
class Block:
    """Covariance of one parameter tensor: ``kron(out_basis, in_basis)
    diag(inv.flatten()) kron(out_basis, in_basis)^T``.

    ``inv`` is ``(out, in)`` for a weight and ``(out,)`` for a bias (then
    ``in_basis`` is ``None``); a ``None`` basis is the identity.
    """

    out_basis: Tensor | None
    in_basis: Tensor | None
    inv: Tensor


def kron_blocks(precision: KronDecomposed) -> list[Block]:
    """Blocks of the inverse of a :class:`KronDecomposed` posterior precision."""
    blocks = []
    for b, Q in enumerate(precision.eigenvectors):
        inv = precision.block_eigenvalues(b).reciprocal()
        if len(Q) == 2:
            blocks.append(Block(Q[0], Q[1], inv.reshape(len(Q[0]), len(Q[1]))))
        else:
            blocks.append(Block(Q[0], None, inv))
    return blocks


def diag_blocks(variance: Tensor, params: Sequence[Tensor]) -> list[Block]:
    """Blocks of a diagonal posterior covariance ``(n_params,)``."""
    chunks = variance.split([p.numel() for p in params])
    return [
        Block(None, None, v.reshape(p.shape[0], -1) if p.ndim >= 2 else v)
        for v, p in zip(chunks, params)
    ]
