"""Kronecker-factored (KFAC) Laplace: one Kronecker product per layer."""

from __future__ import annotations

from typing import Any

import torch

from laplace.checkpoint import symmetric_entry, tensor_entry
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.fast_glm import kron_blocks
from laplace.parametric.layer_curvature import exact_ggn_closure
from laplace.signatures import KRON, constructor
from laplace.utils.matrix import Kron, KronDecomposed

__all__ = ["KronLaplace", "kron_layout"]


class KronLaplace(ParametricLaplace):
    """Laplace approximation with a block-diagonal Kronecker-factored posterior
    precision: per parameter tensor ``G kron A / (sigma^2 T) + delta I`` (KFAC).

    After ``fit``, ``H_facs`` holds the accumulated :class:`Kron` factors and ``H``
    their eigendecomposition (:class:`KronDecomposed`), so that changing the prior
    precision (scalar or one per layer) costs no new decomposition.

    Parameters
    ----------
    damping : bool, default=False
        Add the prior precision to each Kronecker factor (``sqrt(delta)`` each)
        instead of to their product.
    """

    _key = ("all", "kron")

    __init__ = constructor(KRON)

    def _setup(self, options: dict[str, Any]) -> None:
        self.damping = options["damping"]
        self.H_facs: Kron | None = None
        super()._setup(options)

    def _prior_precision_lengths(self) -> dict[int, str] | None:
        # a per-parameter prior would break the Kronecker structure
        if self.n_params is None:
            return None
        return {1: "scalar", self.n_layers: "one per layer"}

    def _zero_H(self) -> Kron:
        return Kron.init_from_model(self.params, self._device, self._dtype)

    def _init_H(self) -> None:
        super()._init_H()
        self.H_facs = None

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        found = exact_ggn_closure(self, X, y, "kron", N)
        if found is not None:
            return found
        return self.backend.kron(X, y, N=N)

    def _carried_H(self, n_new: int) -> Kron:
        # Input factors are averages over the data: re-weight the old ones so that
        # old + new equals the factors of a single fit on all data.
        weight = self.n_data / (self.n_data + n_new)
        return Kron(
            [
                [block[0], block[1] * weight] if len(block) == 2 else list(block)
                for block in self.H_facs.kfacs
            ]
        )

    def _curvature_tensors(self, H: Kron) -> list[torch.Tensor]:
        return [F for block in H.kfacs for F in block]

    def _rebuild_curvature(self, H: Kron, tensors: list[torch.Tensor]) -> Kron:
        it = iter(tensors)
        return Kron([[next(it) for _ in block] for block in H.kfacs])

    def _curvature_is_finite(self, H: Kron) -> bool:
        return all(bool(torch.isfinite(F).all()) for b in H.kfacs for F in b)

    def _posterior_state(self, H: Kron) -> dict[str, Any]:
        return {"H_facs": H, "H": H.decompose(damping=self.damping)}

    @property
    def _prior_deltas(self) -> torch.Tensor:
        return self.prior_precision.expand(self.n_layers)

    @property
    def _posterior_precision(self) -> KronDecomposed:
        """:class:`KronDecomposed` with the prior added to each block."""
        self._check_fitted()
        return self._H * self._H_factor + self._prior_deltas

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        return self._posterior_precision.logdet()

    def _H_spectrum(self) -> tuple[torch.Tensor, int] | None:
        if self.damping or not isinstance(self._H, KronDecomposed):
            # damping adds the prior to each factor, not to the product's eigenvalues
            return None
        evals = [
            torch.outer(*ls).flatten() if len(ls) == 2 else ls[0]
            for ls in self._H.eigenvalues
        ]
        return torch.cat(evals), self.n_layers

    def _cov_square_form(self, W: torch.Tensor) -> torch.Tensor:
        return self._posterior_precision.inv_square_form(W)

    def _glm_fast_route(
        self, x: Any, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # per layer in the factors' eigenbases: no Jacobians (see fast_glm)
        if not self._treats_all_weights:
            return None
        blocks = kron_blocks(self._posterior_precision)
        return self._per_layer_glm(x, blocks, diagonal)

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        return delta @ self._posterior_precision.bmm(delta, exponent=1)

    def _sample_deviations(self, eps: torch.Tensor) -> torch.Tensor:
        return self._posterior_precision.covariance_root_bmm(eps)

    def _H_state(self) -> list[list[torch.Tensor]]:
        # laplace-torch's format: the factors, one list per parameter tensor
        return [list(block) for block in self.H_facs.kfacs]

    def _validated_H(self, value: Any) -> Kron:
        shapes = kron_layout(self.params)
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
                F = tensor_entry(F, name, shape, like=self.prior_precision)
                factors.append(symmetric_entry(F, name))
            blocks.append(factors)
        return Kron(blocks)


def kron_layout(params: list[torch.Tensor]) -> list[list[tuple[int, int]]]:
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
