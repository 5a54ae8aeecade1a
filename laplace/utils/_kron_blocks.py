"""Shared pieces of :mod:`laplace.utils.matrix`: block validation, Kronecker
products on rows, grouped eigendecompositions and the bookkeeping base class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from laplace.utils.linalg import symeig

Blocks = list[list[Tensor]]


def _validate_blocks(
    blocks: Sequence[Sequence[Tensor]],
    name: str,
    cls: str,
    ndims: tuple[int, ...] = (2,),
) -> Blocks:
    """Check 1 or 2 factors per block, each with ``ndim`` in ``ndims`` (2: a
    square matrix; 1: a vector, for a Kron factor the diagonal matrix)."""
    blocks = [list(block) for block in blocks]
    if len(blocks) == 0:
        raise ValueError(f"{cls}: `{name}` is empty; need at least one block.")
    kinds = {2: "a square matrix", 1: "a vector"}
    kind = " or ".join(kinds[n] for n in ndims)
    for b, block in enumerate(blocks):
        valid = len(block) in (1, 2) and all(
            isinstance(F, Tensor) and F.ndim in ndims and F.shape[0] == F.shape[-1]
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
    """Rows `(N, p)` times the block ``kron(*factors)`` -> `(N, p)`; a 1-d factor
    ``d`` is ``diag(d)``."""
    if len(factors) == 1:
        F = factors[0]
        return X * F if F.ndim == 1 else X @ F
    F1, F2 = factors
    Y = X.reshape(-1, F1.shape[0], F2.shape[0])
    Y = F1.unsqueeze(-1) * Y if F1.ndim == 1 else F1.mT @ Y
    Y = Y * F2 if F2.ndim == 1 else Y @ F2
    return Y.reshape(X.shape)


def _dense(F: Tensor) -> Tensor:
    """A factor as a matrix: a 1-d factor ``d`` is ``diag(d)``."""
    return torch.diag(F) if F.ndim == 1 else F


def _diagonal(F: Tensor) -> Tensor:
    return F if F.ndim == 1 else F.diagonal()


def _as_rows(W: Tensor, n_params: int, fn: str) -> Tensor:
    if W.ndim == 0 or W.shape[-1] != n_params:
        raise ValueError(
            f"{fn}: `W` must have shape (..., {n_params}) (batch, k, P), (k, P) or "
            f"(P,); got {tuple(W.shape)}."
        )
    return W.reshape(-1, n_params)


def _grouped_symeig(blocks: Blocks) -> tuple[Blocks, Blocks]:
    """Eigendecompose all factors, batching matrices of equal size; a 1-d factor
    ``d`` (``diag(d)``) has eigenvalues ``d`` and the identity as eigenvectors."""
    groups: dict[int, list[tuple[int, int]]] = {}
    eigvals: Blocks = [[None] * len(block) for block in blocks]
    eigvecs: Blocks = [[None] * len(block) for block in blocks]
    for b, block in enumerate(blocks):
        for f, F in enumerate(block):
            if F.ndim == 1:
                eye = torch.eye(len(F), device=F.device, dtype=F.dtype)
                eigvals[b][f], eigvecs[b][f] = F, eye
            else:
                groups.setdefault(F.shape[0], []).append((b, f))
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
