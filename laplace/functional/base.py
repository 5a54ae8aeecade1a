"""``BaseFunctionalLaplace``: what the function-space (GP) Laplace approximations
share -- the GP predictive and its link approximations, sampling, scalar-prior
hyperparameters and validated checkpoints.

Subclasses hold a Gaussian over the linearised network's outputs with mean the
network output at the MAP and implement

- ``functional_variance(Js)``: per-input covariance ``(batch, O, O)`` for
  Jacobians ``Js`` of shape ``(batch, O, P)``,
- ``functional_covariance(Js)``: joint covariance ``(batch * O, batch * O)``,
- ``_moments(x, joint)`` when a cheaper route than the Jacobians exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from laplace.approximation import BaseLaplace, eval_mode
from laplace.functional.checkpoint import FunctionalCheckpointMixin
from laplace.functional.prediction import FunctionalPredictionMixin, Inputs
from laplace.signatures import FUNCTIONAL, constructor
from laplace.utils.enums import PredType, PriorStructure
from laplace.utils.model_checks import check_model_output
from laplace.utils.parameter_vector import parameters_to_vector

__all__ = ["BaseFunctionalLaplace"]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    return seed


def _check_zero_prior_mean(prior_mean: torch.Tensor, cls_name: str) -> None:
    if bool((prior_mean.detach() != 0).any()):
        raise ValueError(f"{cls_name} supports only prior_mean=0; got {prior_mean}.")


class BaseFunctionalLaplace(
    FunctionalCheckpointMixin, FunctionalPredictionMixin, BaseLaplace
):
    """Base class of the GP-view Laplace approximations (FunctionalLaplace,
    FunctionalLLLaplace, ELLA, VaLLA); see :class:`~laplace.BaseLaplace` for the
    constructor arguments. Only a scalar (isotropic) prior precision is allowed
    and only ``pred_type='gp'`` predictions exist.
    """

    _key: tuple[str, str] | None = None

    __init__ = constructor(FUNCTIONAL)

    def _setup(self, options: dict[str, Any]) -> None:
        self.n_params: int | None = None
        super()._setup(options)
        self._init_params()

    # ---- parameters and hyperparameters -----------------------------------------
    def _init_params(self) -> None:
        self.params = self._treated_parameters()
        if not self.params:
            raise ValueError("The model has no parameter with requires_grad=True.")
        self.n_layers = len(self.params)
        self.n_params = sum(p.numel() for p in self.params)
        self._refresh_mean()
        self.prior_mean = self.prior_mean

    def _refresh_mean(self) -> None:
        self.mean = self._parameter_vector()

    def _parameter_vector(self) -> torch.Tensor:
        """The MAP: the treated parameters as a new vector ``(n_params,)``."""
        return parameters_to_vector(self.params).detach().to(self._dtype)

    def _prior_precision_lengths(self) -> dict[int, str]:
        return {1: "scalar (isotropic prior)"}

    def _prior_mean_lengths(self) -> dict[int, str] | None:
        if self.n_params is None:
            return None
        return {1: "scalar", self.n_params: "one per parameter"}

    def _hyperparameters_changed(self) -> None:
        self._cache = None

    @property
    def gp_kernel_prior_variance(self) -> torch.Tensor:
        """Prior variance of the weights, ``1 / prior_precision``: the NTK kernel is
        ``J(x) J(x')^T * gp_kernel_prior_variance``."""
        return 1.0 / self.prior_precision

    # ---- data ----------------------------------------------------------------------------
    def _jacobians(
        self, x: Inputs, enable_backprop: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, O, P)`` and outputs ``(batch, O)`` at the MAP;
        ``enable_backprop`` defaults to the attribute."""
        backprop = self.enable_backprop if enable_backprop is None else enable_backprop
        Js, f = self.backend.jacobians(x, enable_backprop=backprop)
        return Js.to(self._dtype), f.to(self._dtype)

    def _jacobians_and_output(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, O, P)`` and the network output ``(batch, O)`` of one
        forward pass over the batch, ``model(x)``: the predictive mean. (The
        Jacobian routes evaluate the network per sample, which may round
        differently.)"""
        Js, _ = self._jacobians(x)
        return Js, self.model(x)

    def _lambda_sqrt(self, f: torch.Tensor) -> torch.Tensor | None:
        """``L_n`` with ``L_n L_n^T`` the output Hessian of the loss (the GGN's
        Lambda) at outputs ``f`` ``(batch, O)``: ``(batch, O, O)``, ``None`` for
        regression (identity)."""
        lik = self._likelihood_model
        return None if lik.identity_hessian else lik.hessian_root(f.detach())

    def _batch_loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed training loss of a batch (backend convention), ``()``."""
        y = self._check_targets(y, f.shape[-1])
        return self._likelihood_model.loss(f, y).to(self._dtype)

    def _check_model_outputs(self, X: Inputs) -> int:
        with torch.no_grad(), eval_mode(self.model):
            out = check_model_output(self.model(X), self.likelihood)
        self._outputs_checked = True
        return out.shape[-1]

    def _check_first_batch(self, train_loader: Iterable) -> None:
        """Check the model's outputs on the first batch of ``train_loader``."""
        X, _ = next(self._batches(train_loader), (None, None))
        if X is None:
            raise ValueError("train_loader yielded no batches.")
        self._check_model_outputs(X)

    # ---- prior tuning ----------------------------------------------------------------
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GP,
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: str = "scalar",
        val_loader: Iterable | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: str = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """As :meth:`laplace.BaseLaplace.optimize_prior_precision`, restricted to
        ``pred_type='gp'`` and ``prior_structure='scalar'``."""
        self._check_pred_type(pred_type)
        structure = PriorStructure.parse(prior_structure, "prior_structure")
        if structure is not PriorStructure.SCALAR:
            raise ValueError(
                f"{type(self).__name__} supports only prior_structure='scalar'; got "
                f"{structure.value!r}."
            )
        super().optimize_prior_precision(
            pred_type=PredType.GP,
            method=method,
            n_steps=n_steps,
            lr=lr,
            init_prior_prec=init_prior_prec,
            prior_structure=structure,
            val_loader=val_loader,
            loss=loss,
            log_prior_prec_min=log_prior_prec_min,
            log_prior_prec_max=log_prior_prec_max,
            grid_size=grid_size,
            link_approx=link_approx,
            n_samples=n_samples,
            verbose=verbose,
            progress_bar=progress_bar,
            log_prior_prec_base=log_prior_prec_base,
        )
