"""Kronecker-factored posterior precision (KFAC): per parameter tensor
``c G kron A + delta I`` (or, with ``damping``, ``(sqrt(c) G + sqrt(delta) I)
kron (sqrt(c) A + sqrt(delta) I)``).

The summed factors (:class:`~laplace.utils.matrix.Kron`) are the curvature;
their eigendecomposition (:class:`~laplace.utils.matrix.KronDecomposed`) is
computed once per curvature, so a new prior precision (scalar or one per layer)
costs no new decomposition. Input factors ``A`` are averages over the data,
``G`` sums, so per-batch factors add up to the full-data KFAC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from laplace.checkpoint import symmetric_entry, tensor_entry
from laplace.structures.blocks import Block, kron_blocks
from laplace.structures.protocol import Layout, PosteriorStructure, Precision, Spectrum
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.memo import Memo

__all__ = ["KroneckerStructure", "KroneckerPrecision", "kron_layout"]


class KroneckerPrecision(Precision):
    """``c H + delta`` for the eigendecomposed curvature ``H`` and one prior
    ``delta`` per parameter tensor: a :class:`KronDecomposed`."""

    def __init__(self, decomposed: KronDecomposed, factor: Tensor, deltas: Tensor):
        super().__init__()
        self.decomposed = decomposed * factor + deltas

    @property
    def public(self) -> KronDecomposed:
        return self.decomposed

    def logdet(self) -> Tensor:
        return self.decomposed.logdet()

    def square_form(self, W: Tensor) -> Tensor:
        return self.decomposed.inv_square_form(W)

    def quadratic(self, delta: Tensor) -> Tensor:
        return delta @ self.decomposed.bmm(delta, exponent=1)

    def sample_deviations(self, eps: Tensor) -> Tensor:
        return self.decomposed.covariance_root_bmm(eps)

    def layer_blocks(self, params: Sequence[Tensor]) -> list[Block]:
        return kron_blocks(self.decomposed)

    def covariance(self) -> Tensor:
        return self.decomposed.to_matrix(exponent=-1)


class KroneckerStructure(PosteriorStructure):
    """``hessian_structure='kron'``; ``damping`` adds the prior to each factor."""

    name = "kron"
    # a per-parameter prior would break the Kronecker structure
    per_parameter_prior = False

    def __init__(self, options: dict[str, Any]) -> None:
        self.damping = bool(options["damping"])

    def zero(self, layout: Layout, device: Any, dtype: Any) -> Kron:
        return Kron.init_from_model(list(layout.params), device, dtype)

    def batch(
        self, backend: Any, X: Any, y: Tensor, N: int, dtype: torch.dtype
    ) -> tuple[Tensor, Kron]:
        return backend.kron(X, y, N=N)

    def carried(self, H: Kron, n_old: int, n_new: int) -> Kron:
        # input factors are averages over the data: re-weight the old ones so that
        # old + new equals the factors of a single fit on all data
        weight = n_old / (n_old + n_new)
        return Kron(
            [
                [block[0], block[1] * weight] if len(block) == 2 else list(block)
                for block in H.kfacs
            ]
        )

    def tensors(self, H: Kron) -> list[Tensor]:
        return [F for block in H.kfacs for F in block]

    def rebuild(self, H: Kron, tensors: list[Tensor]) -> Kron:
        it = iter(tensors)
        return Kron([[next(it) for _ in block] for block in H.kfacs])

    def is_finite(self, H: Kron) -> bool:
        return all(bool(torch.isfinite(F).all()) for b in H.kfacs for F in b)

    def decomposed(self, H: Kron, memo: Memo) -> KronDecomposed:
        """The eigendecomposition of ``H``, computed once per ``H``."""
        return memo.get(
            "H_decomposed", (H, self.damping), lambda: H.decompose(self.damping)
        )

    def precision(
        self,
        H: Kron,
        factor: Tensor,
        prior_precision: Tensor,
        layout: Layout,
        memo: Memo,
    ) -> KroneckerPrecision:
        deltas = prior_precision.expand(len(layout.groups))
        return KroneckerPrecision(self.decomposed(H, memo), factor, deltas)

    def public(self, H: Kron, memo: Memo) -> KronDecomposed:
        return self.decomposed(H, memo)

    def spectrum(self, H: Kron, memo: Memo) -> Spectrum | None:
        if self.damping:
            # the prior is added to each factor, not to the product's eigenvalues
            return None
        evals = [
            torch.outer(*ls).flatten() if len(ls) == 2 else ls[0]
            for ls in self.decomposed(H, memo).eigenvalues
        ]
        return torch.cat(evals), len(evals)

    def saved(self, H: Kron) -> list[list[Tensor]]:
        # laplace-torch's format: the factors, one list per parameter tensor
        return [list(block) for block in H.kfacs]

    def loaded(self, value: Any, layout: Layout, like: Tensor) -> Kron:
        shapes = kron_layout(layout.params)
        if not isinstance(value, list | tuple) or len(value) != len(shapes):
            raise ValueError(
                "State dict entry 'H' must be a list of Kronecker factor lists, one "
                f"per parameter tensor ({len(shapes)} here); got "
                f"{_describe(value)}."
            )
        blocks = []
        for i, (block, expected) in enumerate(zip(value, shapes)):
            if not isinstance(block, list | tuple) or len(block) != len(expected):
                raise ValueError(
                    f"State dict entry 'H[{i}]' must be a list of {len(expected)} "
                    f"factors of shapes {expected}; got {_describe(block)}."
                )
            factors = []
            for j, (F, shape) in enumerate(zip(block, expected)):
                name = f"H[{i}][{j}]"
                if isinstance(F, torch.Tensor) and F.ndim == 1:
                    # a diagonal factor stored as its diagonal
                    F = torch.diag(tensor_entry(F, name, shape[:1]))
                F = tensor_entry(F, name, shape, like=like)
                factors.append(symmetric_entry(F, name))
            blocks.append(factors)
        return Kron(blocks)


def kron_layout(params: Sequence[Tensor]) -> list[list[tuple[int, int]]]:
    """Shapes of the Kronecker factors per parameter tensor: ``[(out, out), (in,
    in)]`` for weights (``in`` the product of the trailing dims), ``[(n, n)]``
    for vectors (see :class:`~laplace.utils.matrix.Kron`)."""
    layout = []
    for p in params:
        if p.ndim >= 2:
            out, n_in = p.shape[0], p[0].numel()
            layout.append([(out, out), (n_in, n_in)])
        else:
            layout.append([(p.numel(), p.numel())])
    return layout


def _describe(value: Any) -> str:
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of length {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
