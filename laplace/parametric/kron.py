"""Kronecker-factored (KFAC) Laplace: one Kronecker product per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.fast_glm import kron_blocks
from laplace.parametric.layer_curvature import exact_ggn_closure
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron, KronDecomposed

__all__ = ["KronLaplace"]


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

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        damping: bool = False,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.damping = damping
        self.H_facs: Kron | None = None
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            asdl_fisher_kwargs=asdl_fisher_kwargs,
        )

    def _allowed_prior_lengths(self) -> tuple[int, ...]:
        # a per-parameter prior would break the Kronecker structure
        return (1, self.n_layers)

    def _init_H(self) -> None:
        self.H = Kron.init_from_model(self.params, self._device, self._dtype)
        self.H_facs = None

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        found = exact_ggn_closure(self, X, y, "kron", N)
        if found is not None:
            return found
        return self.backend.kron(X, y, N=N)

    def _before_accumulate(self, n_new: int) -> None:
        # Input factors are averages over the data: re-weight the old ones so that
        # old + new equals the factors of a single fit on all data.
        weight = self.n_data / (self.n_data + n_new)
        self.H = Kron(
            [
                [block[0], block[1] * weight] if len(block) == 2 else list(block)
                for block in self.H_facs.kfacs
            ]
        )

    def _curvature_tensors(self) -> list[torch.Tensor]:
        return [F for block in self._H.kfacs for F in block]

    def _set_curvature_tensors(self, tensors: list[torch.Tensor]) -> None:
        it = iter(tensors)
        self.H = Kron([[next(it) for _ in block] for block in self._H.kfacs])

    def _curvature_is_finite(self) -> bool:
        return all(bool(torch.isfinite(f).all()) for b in self._H.kfacs for f in b)

    def _after_fit(self) -> None:
        self.H_facs = self._H
        self.H = self.H_facs.decompose(damping=self.damping)

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

    def _H_state(self) -> Any:
        return [list(block) for block in self.H_facs.kfacs]

    def _load_H_state(self, state: Any) -> None:
        self.H = Kron(
            [[f.to(self._device, self._dtype) for f in block] for block in state]
        )
