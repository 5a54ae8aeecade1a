"""``BaseFunctionalLaplace``: what the function-space (GP) Laplace approximations
share beyond the surface of every Laplace class (predictive, tuning, marginal
likelihood, checkpoints): the treated parameters (all weights or, through the
last-layer selector, the last layer), a scalar prior, the GP predictive's
moments and samples, the training loss and the loss-Hessian roots.

Subclasses hold a Gaussian over the linearised network's outputs with mean the
network output at the MAP and implement

- ``functional_variance(Js)``: per-input covariance ``(batch, O, O)`` for
  Jacobians ``Js`` of shape ``(batch, O, P)``,
- ``functional_covariance(Js)``: joint covariance ``(batch * O, batch * O)``,
- ``_gp_moments(x, joint)`` when a cheaper route than the Jacobians exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from laplace.approximation import BaseLaplace, MarginalLikelihoodMixin, atomic
from laplace.functional.checkpoint import FunctionalCheckpointMixin
from laplace.predictive.surface import (
    Inputs,
    PredictiveMixin,
    predictive_alias,
    predictive_call,
)
from laplace.selectors import AllWeights, ParameterSelector
from laplace.signatures import FUNCTIONAL, constructor
from laplace.tuning import tuning_method
from laplace.utils.autograd_mode import autograd_enabled, preserve_model_gradients
from laplace.utils.empty import empty_predictive
from laplace.utils.enums import PredType, PriorStructure
from laplace.utils.eval_mode import eval_mode
from laplace.utils.memo import Memo
from laplace.utils.parameter_vector import parameters_to_vector

__all__ = [
    "BaseFunctionalLaplace",
    "check_seed",
    "check_zero_prior_mean",
    "fit_method",
    "positive_int",
]


def fit_method(fit: Callable[..., None]) -> Callable[..., None]:
    """A ``fit`` of a function-space class: a transaction (a failing fit leaves
    the object as it was), with autograd on and the model's ``.grad`` and
    ``requires_grad`` as before."""
    return atomic(autograd_enabled(preserve_model_gradients(fit)))


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return value


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}.")
    return seed


def check_zero_prior_mean(prior_mean: Tensor, cls_name: str) -> None:
    if bool((prior_mean.detach() != 0).any()):
        raise ValueError(f"{cls_name} supports only prior_mean=0; got {prior_mean}.")


class BaseFunctionalLaplace(
    FunctionalCheckpointMixin, PredictiveMixin, MarginalLikelihoodMixin, BaseLaplace
):
    """Base class of the GP-view Laplace approximations (FunctionalLaplace,
    FunctionalLLLaplace, ELLA, VaLLA); see :class:`~laplace.BaseLaplace` for the
    constructor arguments. Only a scalar (isotropic) prior precision is allowed
    and only ``pred_type='gp'`` predictions exist.
    """

    _selector_type: ClassVar[type[ParameterSelector]] = AllWeights
    _pred_types = (PredType.GP,)

    __init__ = constructor(FUNCTIONAL)
    __call__ = predictive_call(PredType.GP)
    predictive = predictive_alias(PredType.GP)
    optimize_prior_precision = tuning_method(PredType.GP, "marglik")

    def _setup(self, options: dict[str, Any]) -> None:
        self._selector = self._selector_type(options)
        self._memo = Memo()
        self.n_params: int | None = None
        super()._setup({**options, "model": self._selector.model})
        self._init_params()

    # ---- parameters and hyperparameters -----------------------------------------
    def _init_params(self) -> None:
        layout = self._selector.layout()
        if layout is None:  # the last layer is found on the first batch of fit()
            self.params, self.mean, self.n_params, self.n_layers = [], None, None, 0
            return
        self.params = list(layout.params)
        self.n_layers = len(self.params)
        self.n_params = layout.n_params
        self._refresh_mean()
        self.prior_mean = self.prior_mean

    def _use_found_parameters(self) -> None:
        self._backend = None
        self._init_params()

    def _treated_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params) if self.params else super()._treated_parameters()

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return {**super()._backend_init_kwargs(), **self._selector.backend_options()}

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._selector.rollback(), super()._transaction():
            yield

    def _refresh_mean(self) -> None:
        self.mean = self._parameter_vector()

    def _parameter_vector(self) -> Tensor:
        """The MAP: the treated parameters as a new vector ``(n_params,)``."""
        return parameters_to_vector(self.params).detach().to(self._dtype)

    def _prior_precision_lengths(self) -> dict[int, str]:
        return {1: "scalar (isotropic prior)"}

    def _prior_mean_lengths(self) -> dict[int, str] | None:
        if self.n_params is None:
            return None
        return {1: "scalar", self.n_params: "one per parameter"}

    @property
    def gp_kernel_prior_variance(self) -> Tensor:
        """Prior variance of the weights, ``1 / prior_precision``: the NTK kernel is
        ``J(x) J(x')^T * gp_kernel_prior_variance``."""
        return 1.0 / self.prior_precision

    def _check_tuning(self, pred_type: Any, method: Any, prior_structure: Any) -> Any:
        self._check_pred_type(pred_type)
        structure = PriorStructure.parse(prior_structure, "prior_structure")
        if structure is not PriorStructure.SCALAR:
            raise ValueError(
                f"{type(self).__name__} supports only prior_structure='scalar'; got "
                f"{structure.value!r}."
            )
        return PredType.GP

    # ---- data ----------------------------------------------------------------------------
    def _jacobians(
        self, x: Inputs, enable_backprop: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Jacobians ``(batch, O, P)`` and outputs ``(batch, O)`` at the MAP;
        ``enable_backprop`` defaults to the attribute."""
        backprop = self.enable_backprop if enable_backprop is None else enable_backprop
        Js, f = self._selector.jacobians(self.backend, x, backprop, self._make_backend)
        return Js.to(self._dtype), f.to(self._dtype)

    def _jacobians_and_output(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Jacobians ``(batch, O, P)`` and the network output ``(batch, O)``: one
        forward pass over the batch (the Jacobian routes may evaluate the network
        per sample, which may round differently)."""
        Js, f = self._jacobians(x)
        return Js, (f if self._selector.batched_outputs else self.model(x))

    def _lambda_sqrt(self, f: Tensor) -> Tensor | None:
        """``L_n`` with ``L_n L_n^T`` the output Hessian of the loss (the GGN's
        Lambda) at outputs ``f`` ``(batch, O)``: ``(batch, O, O)``, ``None`` for
        an identity (regression)."""
        lik = self._likelihood_model
        return None if lik.identity_hessian else lik.hessian_root(f.detach())

    def _batch_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed training loss of a batch (backend convention), ``()``."""
        y = self._check_targets(y, f.shape[-1])
        return self._likelihood_model.loss(f, y).to(self._dtype)

    def _check_model_outputs(self, X: Inputs) -> int:
        with torch.no_grad(), eval_mode(self.model):
            out = self._selector.checked_outputs(X, self.likelihood)
        self._outputs_checked = True
        return out.shape[-1]

    def _check_first_batch(self, train_loader: Iterable) -> None:
        """Check the model's outputs on the first batch of ``train_loader`` (and
        find the last layer there)."""
        X, _ = next(self._batches(train_loader), (None, None))
        if X is None:
            raise ValueError("train_loader yielded no batches.")
        try:
            if self.n_params is None:
                self._selector.find(X)
                self._use_found_parameters()
            self._check_model_outputs(X)
        finally:
            self._selector.forget_pass()

    # ---- predictions ---------------------------------------------------------------------
    def _check_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        if model_kwargs:
            raise ValueError(
                f"{type(self).__name__} does not forward model keyword arguments; "
                f"got {sorted(model_kwargs)}."
            )

    def _sampling_pred_type(self, pred_type: Any) -> PredType:
        # laplace-torch's signature takes any pred_type: the samples are the GP's
        PredType.parse(pred_type, "pred_type")
        return PredType.GP

    def _moments(self, x: Inputs, joint: bool, diagonal: bool) -> tuple[Tensor, Tensor]:
        f, var = self._gp_moments(x, joint)
        return f.to(self._dtype), var

    def _gp_moments(self, x: Inputs, joint: bool) -> tuple[Tensor, Tensor]:
        Js, f = self._jacobians_and_output(x)
        if joint:
            return f.flatten(), self.functional_covariance(Js)
        return f, self.functional_variance(Js)

    def predictive_moments(
        self, x: Inputs, *, joint: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Latent mean ``(batch, O)`` and covariance ``(batch, O, O)`` at ``x``
        (no observation noise); ``joint=True``: ``(batch * O,)`` and
        ``(batch * O, batch * O)`` over all inputs and outputs. In the model's
        dtype."""
        return self._to_output(self._predictive_moments(x, joint))

    def _predictive_moments(self, x: Inputs, joint: bool) -> tuple[Tensor, Tensor]:
        """:meth:`predictive_moments` in the computation dtype."""
        self._check_fitted()
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            width = self._empty_width(x)
            if width is not None:
                return empty_predictive(width, self.mean, False, joint)
            return self._moments(x, joint, False)

    def functional_variance(self, Js: Tensor) -> Tensor:
        """Posterior covariance of the outputs per input, ``(batch, O, O)``, for
        Jacobians ``Js`` ``(batch, O, P)``."""
        raise NotImplementedError

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint posterior covariance of all outputs of all inputs,
        ``(batch * O, batch * O)``."""
        raise NotImplementedError

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Not available: a function-space posterior has no Gaussian over the
        weights to draw from; use :meth:`functional_samples`."""
        raise NotImplementedError(
            f"{type(self).__name__} is a posterior over functions, not weights: it "
            "has no weight samples; draw function values with functional_samples(x)."
        )

    def _validation_nll(self, loader: Iterable) -> float:
        """Mean negative log predictive density on ``loader`` (see
        :meth:`~laplace.likelihoods.LikelihoodModel.predictive_nll`)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for X, y in self._batches(loader):
                f_mu, f_var = self._predictive_moments(X, joint=False)
                nll = self._likelihood_model.predictive_nll(
                    f_mu, f_var, y, self.sigma_noise
                )
                total += float(nll)
                count += len(y)
        if count == 0:
            raise ValueError("val_loader yielded no data.")
        return total / count
