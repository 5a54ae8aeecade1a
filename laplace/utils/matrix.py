"""Kronecker-factored block-diagonal matrices for K-FAC curvature.

Layout: one diagonal block per parameter tensor, stored as a list of one or
two square factors.

* weight-like parameters (``ndim >= 2``, shape ``(out, *rest)``) have
  ``[G, A]`` with ``G`` of shape `(out, out)` and ``A`` of shape
  `(in, in)`, ``in = prod(rest)``; the block is ``kron(G, A)``.  This matches
  PyTorch's row-major flattening: entry ``i * in + j`` of the flattened block
  is ``weight.reshape(out, in)[i, j]``.
* vector-like parameters (``ndim <= 1``) have ``[G]`` and the block is ``G``.
* a factor may also be a vector ``d`` of length ``n``, meaning ``diag(d)``.

Products never form ``kron(G, A)``: a row vector ``w`` of the block, viewed as
``X = w.reshape(out, in)``, satisfies ``(w @ kron(G, A)).reshape(out, in) ==
G.T @ X @ A``.  :class:`Kron` accumulates curvature, :class:`KronDecomposed`
holds its eigendecomposition plus the prior precision (``deltas``) and
computes everything the posterior needs (inverses, log-determinants, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from laplace.utils._kron_blocks import (
    _as_rows,
    _BlockKronecker,
    _check_scalar,
    _dense,
    _diagonal,
    _grouped_symeig,
    _rmatmul,
    _root,
    _sizes,
    _validate_blocks,
)
from laplace.utils.kron_decomposed import KronDecomposed
from laplace.utils.linalg import block_diag

__all__ = ["Kron", "KronDecomposed"]


class Kron(_BlockKronecker):
    """Block-diagonal matrix of Kronecker-factored blocks (see module docs).

    Parameters
    ----------
    kfacs : list of list of Tensor
        One list per block with factors ``[G]`` or ``[G, A]``, each square or a
        vector ``d`` of length ``n`` meaning ``diag(d)``, on one device with one
        dtype.
    """

    def __init__(self, kfacs: Sequence[Sequence[Tensor]]) -> None:
        self.kfacs = _validate_blocks(kfacs, "kfacs", "Kron", ndims=(2, 1))
        self._factors = self.kfacs

    @classmethod
    def init_from_model(
        cls,
        model: nn.Module | Iterable[nn.Parameter],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """Zero factors for each parameter: of ``model``'s trainable ones, or of
        the given parameters. ``device``/``dtype`` default to each parameter's
        own.
        """
        if isinstance(model, nn.Module):
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = list(model)
        if len(params) == 0:
            raise ValueError("Kron.init_from_model: no (trainable) parameters given.")
        kfacs = []
        for p in params:
            kw = {"device": device or p.device, "dtype": dtype or p.dtype}
            if p.ndim >= 2:
                out = p.shape[0]
                n_in = math.prod(p.shape[1:])
                kfacs.append(
                    [torch.zeros(out, out, **kw), torch.zeros(n_in, n_in, **kw)]
                )
            else:
                n = p.numel()
                kfacs.append([torch.zeros(n, n, **kw)])
        return cls(kfacs)

    def __add__(self, other: Kron) -> Kron:
        """Factor-wise sum (accumulation over batches of normalised factors); a
        vector factor plus a matrix factor is ``diag(d) + F``."""
        if not isinstance(other, Kron):
            return NotImplemented
        sides = [[len(F) for F in block] for block in self.kfacs]
        if sides != [[len(F) for F in block] for block in other.kfacs]:
            raise ValueError("Kron.__add__: `other` has a different block layout.")
        return Kron(
            [
                [F + H if F.ndim == H.ndim else _dense(F) + _dense(H) for F, H in pair]
                for pair in (zip(b1, b2) for b1, b2 in zip(self.kfacs, other.kfacs))
            ]
        )

    def __radd__(self, other: object) -> Kron:
        # Lets ``sum(list_of_krons)`` start from 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, scalar: float | Tensor) -> Kron:
        """Kron whose matrix is ``scalar`` times this one (``scalar >= 0``)."""
        scalar = _check_scalar(scalar, self.kfacs[0][0], "Kron")
        return Kron(
            [[F * _root(scalar, len(block)) for F in block] for block in self.kfacs]
        )

    __rmul__ = __mul__

    def to(self, *args, **kwargs) -> Kron:
        """Copy with factors moved/cast like ``Tensor.to``."""
        return Kron([[F.to(*args, **kwargs) for F in block] for block in self.kfacs])

    def decompose(self, damping: bool = False) -> KronDecomposed:
        """Eigendecompose every factor (via :func:`symeig`)."""
        eigvals, eigvecs = _grouped_symeig(self.kfacs)
        return KronDecomposed(eigvecs, eigvals, damping=damping)

    def bmm(self, W: Tensor, exponent: float = 1) -> Tensor:
        """``W @ M`` for ``W`` of shape `(batch, k, P)`, `(k, P)` or `(P,)`.

        Returns a tensor of ``W``'s shape.  Only ``exponent=1``; other powers
        need ``decompose().bmm(W, exponent)``.
        """
        if exponent != 1:
            raise ValueError(
                f"Kron.bmm: `exponent`={exponent} is not supported, only 1; use "
                "Kron.decompose().bmm(W, exponent) for other powers."
            )
        rows = _as_rows(W, self.n_params, "Kron.bmm")
        chunks = rows.split(_sizes(self.kfacs), dim=-1)
        out = [_rmatmul(X, block) for X, block in zip(chunks, self.kfacs)]
        return torch.cat(out, dim=-1).reshape(W.shape)

    def logdet(self) -> Tensor:
        """Log-determinant, `()`; ``-inf`` for singular factors."""
        eigvals, _ = _grouped_symeig(self.kfacs)
        total = []
        for ls in eigvals:
            if len(ls) == 1:
                total.append(ls[0].log().sum())
            else:
                l1, l2 = ls
                # logdet(kron(G, A)) = dim(A) logdet(G) + dim(G) logdet(A)
                total.append(len(l2) * l1.log().sum() + len(l1) * l2.log().sum())
        return torch.stack(total).sum()

    def diag(self) -> Tensor:
        """Diagonal of the matrix, `(P,)`."""
        out = []
        for block in self.kfacs:
            diagonals = [_diagonal(F) for F in block]
            if len(block) == 1:
                out.append(diagonals[0])
            else:
                out.append(torch.outer(*diagonals).flatten())
        return torch.cat(out)

    def to_matrix(self) -> Tensor:
        """Dense block-diagonal matrix, `(P, P)`."""
        dense = [[_dense(F) for F in block] for block in self.kfacs]
        return block_diag([torch.kron(*b) if len(b) == 2 else b[0] for b in dense])
