"""Eigendecomposed Kronecker-factored block-diagonal matrices (see
:mod:`laplace.utils.matrix`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from laplace.utils._kron_blocks import (
    _as_rows,
    _BlockKronecker,
    _check_scalar,
    _rmatmul,
    _root,
    _sizes,
    _validate_blocks,
)
from laplace.utils.linalg import block_diag

__all__ = ["KronDecomposed"]


class KronDecomposed(_BlockKronecker):
    """Eigendecomposed :class:`Kron` plus per-block prior precision.

    Block ``b`` with factor eigenvalues ``l1`` (of ``G``), ``l2`` (of ``A``) and
    ``delta = deltas[b]`` has eigenvectors ``kron(Q1, Q2)`` and effective
    eigenvalues ``outer(l1, l2).flatten() + delta``, or with ``damping``
    ``outer(l1 + sqrt(delta), l2 + sqrt(delta)).flatten()``; a one-factor block
    has ``l1 + delta``.

    Parameters
    ----------
    eigenvectors, eigenvalues : list of list of Tensor
        Per block, per factor: `(p, p)` orthonormal columns and `(p,)` values.
    deltas : Tensor, optional
        Precision added to each block, `(n_blocks,)` or a scalar; default 0.
    damping : bool
        Add ``sqrt(delta)`` to each factor instead of ``delta`` to the product.
    """

    def __init__(
        self,
        eigenvectors: Sequence[Sequence[Tensor]],
        eigenvalues: Sequence[Sequence[Tensor]],
        deltas: Tensor | float | None = None,
        damping: bool = False,
    ) -> None:
        self.eigenvectors = _validate_blocks(
            eigenvectors, "eigenvectors", "KronDecomposed"
        )
        self.eigenvalues = _validate_blocks(
            eigenvalues, "eigenvalues", "KronDecomposed", ndims=(1,)
        )
        layout = [[Q.shape for Q in block] for block in self.eigenvectors]
        if layout != [[(len(l), len(l)) for l in block] for block in self.eigenvalues]:
            raise ValueError(
                "KronDecomposed: `eigenvectors` and `eigenvalues` have different layouts "
                "(need per block, per factor (p, p) vectors and (p,) values)."
            )
        self._factors = self.eigenvectors
        self.damping = bool(damping)
        self.deltas = self._expand_deltas(0.0 if deltas is None else deltas)

    def _expand_deltas(self, deltas: Tensor | float) -> Tensor:
        n = len(self)
        if isinstance(deltas, Tensor):
            deltas = deltas.to(device=self.device, dtype=self.dtype)
        else:
            deltas = torch.tensor(float(deltas), device=self.device, dtype=self.dtype)
        if deltas.numel() == 1:
            return deltas.reshape(()).expand(n)
        if deltas.shape != (n,):
            raise ValueError(
                f"KronDecomposed: `deltas` must be a scalar or of shape ({n},) (one per "
                f"block), got shape {tuple(deltas.shape)}."
            )
        return deltas

    def __add__(self, deltas: Tensor | float) -> KronDecomposed:
        """Add ``deltas`` (scalar or `(n_blocks,)`) to the existing deltas."""
        if not isinstance(deltas, Tensor | float | int) or isinstance(deltas, bool):
            return NotImplemented
        new = self.deltas + self._expand_deltas(deltas)
        return KronDecomposed(self.eigenvectors, self.eigenvalues, new, self.damping)

    # ``deltas + M`` as ``M + deltas`` (a tensor on the left defers to this)
    __radd__ = __add__

    def __mul__(self, scalar: float | Tensor) -> KronDecomposed:
        """Scale the Kronecker part by ``scalar >= 0`` (deltas unchanged)."""
        scalar = _check_scalar(scalar, self.eigenvalues[0][0], "KronDecomposed")
        eigvals = [
            [l * _root(scalar, len(block)) for l in block] for block in self.eigenvalues
        ]
        return KronDecomposed(self.eigenvectors, eigvals, self.deltas, self.damping)

    __rmul__ = __mul__

    def detach(self) -> KronDecomposed:
        """Copy cut from the autograd graph."""
        vecs = [[Q.detach() for Q in block] for block in self.eigenvectors]
        vals = [[l.detach() for l in block] for block in self.eigenvalues]
        return KronDecomposed(vecs, vals, self.deltas.detach(), self.damping)

    def to(self, *args, **kwargs) -> KronDecomposed:
        """Copy with all tensors moved/cast like ``Tensor.to``."""
        vecs = [[Q.to(*args, **kwargs) for Q in block] for block in self.eigenvectors]
        vals = [[l.to(*args, **kwargs) for l in block] for block in self.eigenvalues]
        return KronDecomposed(vecs, vals, self.deltas.to(*args, **kwargs), self.damping)

    def block_eigenvalues(self, b: int) -> Tensor:
        """Effective eigenvalues of block ``b``, flattened to `(p,)`."""
        ls, delta = self.eigenvalues[b], self.deltas[b]
        if len(ls) == 1:
            return ls[0] + delta
        l1, l2 = ls
        if self.damping:
            root = delta.sqrt()
            return torch.outer(l1 + root, l2 + root).flatten()
        return torch.outer(l1, l2).flatten() + delta

    def _blocks(self, W: Tensor, fn: str):
        """Yield ``(rows, Q, eigenvalues)`` per block for rows of ``W``."""
        rows = _as_rows(W, self.n_params, fn)
        for b, X in enumerate(rows.split(_sizes(self.eigenvalues), dim=-1)):
            yield X, self.eigenvectors[b], self.block_eigenvalues(b)

    def logdet(self) -> Tensor:
        """Log-determinant, `()`, differentiable in deltas and scale."""
        return torch.stack(
            [self.block_eigenvalues(b).log().sum() for b in range(len(self))]
        ).sum()

    def bmm(self, W: Tensor, exponent: float = -1) -> Tensor:
        """``W @ M^exponent`` for ``W`` of shape `(batch, k, P)`, `(k, P)` or `(P,)`.

        Returns a tensor of ``W``'s shape; any real ``exponent``.
        """
        out = []
        for X, Q, lam in self._blocks(W, "KronDecomposed.bmm"):
            Y = _rmatmul(X, Q) * lam.pow(exponent)
            out.append(_rmatmul(Y, [q.mT for q in Q]))
        return torch.cat(out, dim=-1).reshape(W.shape)

    def covariance_root_bmm(self, W: Tensor) -> Tensor:
        """``W @ R^T`` with ``R = Q Lambda^{-1/2}``, so ``R R^T = M^{-1}``: rows of
        standard-normal ``W`` become rows with covariance ``M^{-1}``, at one
        rotation per block instead of the two of ``bmm(W, exponent=-0.5)``.

        ``W``: `(batch, k, P)`, `(k, P)` or `(P,)`; returns ``W``'s shape.
        """
        out = [
            _rmatmul(X * lam.rsqrt(), [q.mT for q in Q])
            for X, Q, lam in self._blocks(W, "KronDecomposed.covariance_root_bmm")
        ]
        return torch.cat(out, dim=-1).reshape(W.shape)

    def inv_square_form(self, W: Tensor) -> Tensor:
        """``W @ M^{-1} @ W^T`` for ``W`` `(batch, k, P)` -> `(batch, k, k)`.

        Also accepts `(k, P)` -> `(k, k)` and `(P,)` -> `()`.
        """
        if W.ndim == 1:
            return self.inv_square_form(W[None])[0, 0]
        lead = W.shape[:-1]
        out = 0
        for X, Q, lam in self._blocks(W, "KronDecomposed.inv_square_form"):
            # M^{-1} = (Q L^{-1/2})(Q L^{-1/2})^T, so only half a product is needed.
            T = (_rmatmul(X, Q) * lam.rsqrt()).reshape(*lead, -1)
            out = out + T @ T.mT
        return out

    def diag(self, exponent: float = 1) -> Tensor:
        """Diagonal of ``M^exponent``, `(P,)`."""
        out = []
        for b, Q in enumerate(self.eigenvectors):
            lam = self.block_eigenvalues(b).pow(exponent)
            if len(Q) == 1:
                out.append(Q[0].square() @ lam)
            else:
                # diag(kron(Q1, Q2) diag(lam) kron(Q1, Q2)^T)[i*n+j]
                #   = sum_ab Q1[i,a]^2 lam[a,b] Q2[j,b]^2
                lam = lam.reshape(len(Q[0]), len(Q[1]))
                out.append((Q[0].square() @ lam @ Q[1].square().mT).flatten())
        return torch.cat(out)

    def to_matrix(self, exponent: float = 1) -> Tensor:
        """Dense ``M^exponent``, `(P, P)`."""
        blocks = []
        for b, Q in enumerate(self.eigenvectors):
            # contiguous: torch.kron fails on some mixes of strides (eigh returns
            # column-major eigenvectors, identities of 1-d factors are row-major)
            Q = torch.kron(*(q.contiguous() for q in Q)) if len(Q) == 2 else Q[0]
            blocks.append((Q * self.block_eigenvalues(b).pow(exponent)) @ Q.mT)
        return block_diag(blocks)
