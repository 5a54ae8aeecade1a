"""Kronecker-factored block-diagonal matrices for K-FAC curvature.

Layout: one diagonal block per parameter tensor, stored as a list of one or
two square factors.

* weight-like parameters (``ndim >= 2``, shape ``(out, *rest)``) have
  ``[G, A]`` with ``G`` of shape `(out, out)` and ``A`` of shape
  `(in, in)`, ``in = prod(rest)``; the block is ``kron(G, A)``.  This matches
  PyTorch's row-major flattening: entry ``i * in + j`` of the flattened block
  is ``weight.reshape(out, in)[i, j]``.
* vector-like parameters (``ndim <= 1``) have ``[G]`` and the block is ``G``.

Products never form ``kron(G, A)``: a row vector ``w`` of the block, viewed as
``X = w.reshape(out, in)``, satisfies ``(w @ kron(G, A)).reshape(out, in) ==
G.T @ X @ A``.  :class:`Kron` accumulates curvature, :class:`KronDecomposed`
holds its eigendecomposition plus the prior precision (``deltas``) and
computes everything the posterior needs (inverses, log-determinants, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from laplace.utils.linalg import block_diag, symeig

__all__ = ["Kron", "KronDecomposed"]

Blocks = list[list[Tensor]]


def _validate_blocks(
    blocks: Sequence[Sequence[Tensor]], name: str, cls: str, ndim: int = 2
) -> Blocks:
    blocks = [list(block) for block in blocks]
    if len(blocks) == 0:
        raise ValueError(f"{cls}: `{name}` is empty; need at least one block.")
    kind = "a square matrix" if ndim == 2 else "a vector"
    for b, block in enumerate(blocks):
        valid = len(block) in (1, 2) and all(
            isinstance(F, Tensor) and F.ndim == ndim and F.shape[0] == F.shape[-1]
            for F in block
        )
        if not valid:
            got = [tuple(F.shape) if isinstance(F, Tensor) else type(F) for F in block]
            raise ValueError(
                f"{cls}: block {b} of `{name}` must hold 1 or 2 factors, each {kind}; "
                f"got {got}."
            )
    ref = blocks[0][0]
    if any(F.device != ref.device or F.dtype != ref.dtype for bl in blocks for F in bl):
        raise ValueError(
            f"{cls}: all tensors in `{name}` must share one device and dtype "
            f"(first is {ref.device}, {ref.dtype})."
        )
    return blocks


def _root(scalar: float | Tensor, n: int) -> float | Tensor:
    # Split the scale symmetrically over the n factors so that damping (which
    # adds to every factor) stays meaningful after scaling.
    return scalar if n == 1 else scalar ** (1.0 / n)


def _check_scalar(scalar: float | Tensor, like: Tensor, cls: str) -> float | Tensor:
    if isinstance(scalar, Tensor):
        if scalar.numel() != 1:
            raise ValueError(
                f"{cls}.__mul__: `scalar` must hold one value, got a tensor of shape "
                f"{tuple(scalar.shape)}."
            )
        # 0-dim keeps the factors' dtype under type promotion.
        scalar = scalar.reshape(()).to(like.device)
        negative = bool(scalar.detach() < 0)
    elif isinstance(scalar, Real) and not isinstance(scalar, bool):
        scalar = float(scalar)
        negative = scalar < 0
    else:
        raise TypeError(
            f"{cls}.__mul__: `scalar` must be a real number or a one-element tensor, "
            f"got {type(scalar).__name__}."
        )
    if negative:
        raise ValueError(
            f"{cls}.__mul__: `scalar` must be non-negative (curvature is PSD), got "
            f"{float(scalar)}."
        )
    return scalar


def _rmatmul(X: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Rows `(N, p)` times the block ``kron(*factors)`` -> `(N, p)`."""
    if len(factors) == 1:
        return X @ factors[0]
    F1, F2 = factors
    Y = F1.mT @ X.reshape(-1, F1.shape[0], F2.shape[0]) @ F2
    return Y.reshape(X.shape)


def _as_rows(W: Tensor, n_params: int, fn: str) -> Tensor:
    if W.ndim == 0 or W.shape[-1] != n_params:
        raise ValueError(
            f"{fn}: `W` must have shape (..., {n_params}) (batch, k, P), (k, P) or "
            f"(P,); got {tuple(W.shape)}."
        )
    return W.reshape(-1, n_params)


def _grouped_symeig(blocks: Blocks) -> tuple[Blocks, Blocks]:
    """Eigendecompose all factors, batching factors of equal size."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for b, block in enumerate(blocks):
        for f, F in enumerate(block):
            groups.setdefault(F.shape[0], []).append((b, f))
    eigvals: Blocks = [[None] * len(block) for block in blocks]
    eigvecs: Blocks = [[None] * len(block) for block in blocks]
    for index in groups.values():
        L, Q = symeig(torch.stack([blocks[b][f] for b, f in index]))
        for i, (b, f) in enumerate(index):
            eigvals[b][f], eigvecs[b][f] = L[i], Q[i]
    return eigvals, eigvecs


def _sizes(blocks: Blocks) -> list[int]:
    # len() of a factor or of an eigenvalue vector is its side length.
    return [math.prod(len(F) for F in block) for block in blocks]


class _BlockKronecker:
    """Shared bookkeeping; subclasses set ``_factors`` (per block, per factor)."""

    _factors: Blocks

    def __len__(self) -> int:
        return len(self._factors)

    def __repr__(self) -> str:
        sizes = [tuple(len(F) for F in block) for block in self._factors]
        return f"{type(self).__name__}(blocks={sizes}, dtype={self.dtype}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self._factors[0][0].device

    @property
    def dtype(self) -> torch.dtype:
        return self._factors[0][0].dtype

    @property
    def n_params(self) -> int:
        """Side length `P` of the full matrix."""
        return sum(_sizes(self._factors))


class Kron(_BlockKronecker):
    """Block-diagonal matrix of Kronecker-factored blocks (see module docs).

    Parameters
    ----------
    kfacs : list of list of Tensor
        One list per block with factors ``[G]`` or ``[G, A]``, square, on one
        device with one dtype.
    """

    def __init__(self, kfacs: Sequence[Sequence[Tensor]]) -> None:
        self.kfacs = _validate_blocks(kfacs, "kfacs", "Kron")
        self._factors = self.kfacs

    @classmethod
    def init_from_model(
        cls,
        model_or_params: nn.Module | Iterable[nn.Parameter],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Kron:
        """Zero factors for each parameter (trainable ones for a module).

        ``device``/``dtype`` default to each parameter's own.
        """
        if isinstance(model_or_params, nn.Module):
            params = [p for p in model_or_params.parameters() if p.requires_grad]
        else:
            params = list(model_or_params)
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
        """Factor-wise sum (accumulation over batches of normalised factors)."""
        if not isinstance(other, Kron):
            return NotImplemented
        shapes = [[F.shape for F in block] for block in self.kfacs]
        if shapes != [[F.shape for F in block] for block in other.kfacs]:
            raise ValueError("Kron.__add__: `other` has a different block layout.")
        return Kron(
            [[F + H for F, H in zip(b1, b2)] for b1, b2 in zip(self.kfacs, other.kfacs)]
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
            if len(block) == 1:
                out.append(block[0].diagonal())
            else:
                out.append(
                    torch.outer(block[0].diagonal(), block[1].diagonal()).flatten()
                )
        return torch.cat(out)

    def to_matrix(self) -> Tensor:
        """Dense block-diagonal matrix, `(P, P)`."""
        return block_diag([torch.kron(*b) if len(b) == 2 else b[0] for b in self.kfacs])


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
            eigenvalues, "eigenvalues", "KronDecomposed", ndim=1
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
        new = self.deltas + self._expand_deltas(deltas)
        return KronDecomposed(self.eigenvectors, self.eigenvalues, new, self.damping)

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

    def _block_eigenvalues(self, b: int) -> Tensor:
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
            yield X, self.eigenvectors[b], self._block_eigenvalues(b)

    def logdet(self) -> Tensor:
        """Log-determinant, `()`, differentiable in deltas and scale."""
        return torch.stack(
            [self._block_eigenvalues(b).log().sum() for b in range(len(self))]
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
            lam = self._block_eigenvalues(b).pow(exponent)
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
            Q = torch.kron(*Q) if len(Q) == 2 else Q[0]
            blocks.append((Q * self._block_eigenvalues(b).pow(exponent)) @ Q.mT)
        return block_diag(blocks)
