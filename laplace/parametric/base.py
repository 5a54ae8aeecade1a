"""``ParametricLaplace``: a Gaussian N(theta_MAP, P^{-1}) over the weights.

The structure of the posterior precision ``P`` (full, Kronecker-factored, diagonal)
is left to subclasses, which implement a handful of hooks:

- ``_init_H`` / ``_curv_closure`` / ``_after_fit``: accumulate curvature in ``fit``,
- ``posterior_precision`` and ``log_det_posterior_precision``,
- ``_cov_square_form(W)``: ``W Sigma W^T`` for ``W`` of shape ``(batch, k, n_params)``,
- ``_sample_deviations(eps)``: ``Sigma^{1/2}`` applied to standard normal draws.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace.base import BaseLaplace, eval_mode
from laplace.distributed import all_reduce_max, all_reduce_sum, data_shard
from laplace.parametric.prediction import ParametricPredictionMixin
from laplace.utils.enums import Likelihood
from laplace.utils.utils import expand_to_parameters, trainable_parameters

__all__ = ["ParametricLaplace"]


class ParametricLaplace(ParametricPredictionMixin, BaseLaplace):
    """Laplace approximation in weight space; see :class:`BaseLaplace` for the
    constructor arguments. Only parameters with ``requires_grad=True`` are treated.
    """

    _key: tuple[str, str] | None = None

    def __init__(self, model: nn.Module, likelihood: Likelihood | str, **kwargs: Any):
        self.n_params: int | None = None
        super().__init__(model, likelihood, **kwargs)
        self._init_params()

    # ---- parameters ----------------------------------------------------------------
    def _init_params(self) -> None:
        """Collect the treated parameters and check the prior against them."""
        self.params = self._treated_parameters()
        if not self.params:
            raise ValueError(
                "The model has no parameter with requires_grad=True to treat."
            )
        self.n_layers = len(self.params)
        self._layer_sizes = [p.numel() for p in self.params]
        self.n_params = sum(self._layer_sizes)
        self.mean = parameters_to_vector(self.params).detach().to(self._dtype)
        self.H = None
        # re-validate hyperparameters now that the sizes are known
        self.prior_precision = self.prior_precision
        self.prior_mean = self.prior_mean

    def _treated_parameters(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    def _check_prior_precision_shape(self, prior_precision: torch.Tensor) -> None:
        if self.n_params is None:
            return
        allowed = self._allowed_prior_lengths()
        if len(prior_precision) not in allowed:
            raise ValueError(
                f"prior_precision has length {len(prior_precision)}; "
                f"{type(self).__name__} accepts lengths {sorted(set(allowed))} "
                f"(scalar, one per layer ({self.n_layers}) or one per parameter "
                f"({self.n_params}))."
            )

    def _allowed_prior_lengths(self) -> tuple[int, ...]:
        return (1, self.n_layers, self.n_params)

    def _check_prior_mean_shape(self, prior_mean: torch.Tensor) -> None:
        if self.n_params is None or prior_mean.ndim == 0:
            return
        if len(prior_mean) not in (1, self.n_params):
            raise ValueError(
                f"prior_mean has length {len(prior_mean)}; expected a scalar or "
                f"n_params={self.n_params} values."
            )

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """The prior precision expanded to ``(n_params,)``."""
        return expand_to_parameters(self.prior_precision, self._layer_sizes)

    @property
    def H(self) -> Any:
        """The log-likelihood curvature, in the model's dtype (kept as ``_H``)."""
        return self._to_output(self._H)

    @H.setter
    def H(self, value: Any) -> None:
        self._H = value

    # ---- fit --------------------------------------------------------------------------
    def fit(
        self, train_loader: Iterable, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Accumulate the log-likelihood curvature and loss over ``train_loader``.

        Parameters
        ----------
        train_loader : torch.utils.data.DataLoader
            Batches ``(X, y)`` or dict-like; ``len(train_loader.dataset)`` must be
            the number of data points.
        override : bool, default=True
            Start from scratch; with ``False`` the curvature of the new data is
            added to the existing one (continual learning), the mean is reset to
            the current parameters.
        progress_bar : bool, default=False

        Notes
        -----
        Under an initialised ``torch.distributed`` process group with more than
        one rank, a loader with a ``DistributedSampler`` is a shard: loss and
        curvature are summed over all ranks (sampler padding dropped), so every
        rank gets the posterior of the whole data set; see
        :mod:`laplace.distributed` and docs/distributed.md.
        """
        n_new = self._dataset_size(train_loader)
        shard = data_shard(train_loader, n_new)
        if shard is not None:
            n_new = shard.global_size
        if override or not self.is_fitted:
            self._init_H()
            self.loss, self.n_data = 0.0, 0
        else:
            self._before_accumulate(n_new)
        carried = self._start_shard() if shard is not None else None
        n_total = self.n_data + n_new
        batches = self._batches(train_loader)
        if shard is not None:
            batches = shard.unpadded(batches, self.dict_key_x)
        if progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Laplace fit")
        seen = 0
        with eval_mode(self.model):
            self._refresh_mean()
            for X, y in batches:
                X, y = self._prepare_batch(X, y)
                loss_batch, H_batch = self._curv_closure(X, y, n_total)
                self.loss = self.loss + loss_batch.detach().to(self._dtype)
                self.H = self._H + H_batch
                seen += 1
        if shard is not None:
            seen = self._reduce_across_ranks(seen, carried)
        if seen == 0:
            raise ValueError("train_loader yielded no batches.")
        self.n_data = n_total
        self._check_finite_fit()
        self._after_fit()

    def _start_shard(self) -> tuple[Any, list[torch.Tensor]]:
        """Set aside what an earlier fit left (``override=False``): only the new
        data is summed over the ranks."""
        carried = (self.loss, self._curvature_tensors())
        self._init_H()
        self.loss = 0.0
        return carried

    def _reduce_across_ranks(
        self, seen: int, carried: tuple[Any, list[torch.Tensor]]
    ) -> int:
        """Sum loss and curvature of a sharded fit over all ranks (see
        :mod:`laplace.distributed`), add back ``carried``; returns the batches
        seen by all ranks."""
        loss = torch.as_tensor(self.loss, dtype=self._dtype, device=self._device)
        reduced = all_reduce_sum([loss.reshape(1), *self._curvature_tensors()])
        self.loss = carried[0] + reduced[0].reshape(())
        self._set_curvature_tensors([c + r for c, r in zip(carried[1], reduced[1:])])
        # a rank without batches has not seen the outputs yet
        self.n_outputs = all_reduce_max(self.n_outputs or 0, self._device) or None
        return all_reduce_max(seen, self._device)

    def _curvature_tensors(self) -> list[torch.Tensor]:
        """The accumulated curvature as tensors (for ``all_reduce``)."""
        if not isinstance(self._H, torch.Tensor):
            raise NotImplementedError(
                f"{type(self).__name__} does not support distributed fitting."
            )
        return [self._H]

    def _set_curvature_tensors(self, tensors: list[torch.Tensor]) -> None:
        (self.H,) = tensors

    def _refresh_mean(self) -> None:
        self.mean = parameters_to_vector(self.params).detach().to(self._dtype)

    def _model_outputs(self, X: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model(X)

    def _prepare_batch(self, X: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Learn ``n_outputs`` on the first batch and check the targets against it."""
        if self.n_outputs is None:
            # reward models output one reward per item; pairs give two logits
            rewards = self.likelihood is Likelihood.REWARD_MODELING
            self.n_outputs = 1 if rewards else int(self._model_outputs(X).shape[-1])
        return X, self._check_targets(y)

    def _check_targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.likelihood is Likelihood.CLASSIFICATION:
            if y.is_floating_point() or y.ndim != 1:
                raise ValueError(
                    "Classification targets must be a 1-d integer tensor of class "
                    f"indices; got dtype {y.dtype} and shape {tuple(y.shape)}."
                )
            if len(y) and (y.min() < 0 or y.max() >= self.n_outputs):
                raise ValueError(
                    f"Classification targets must lie in [0, {self.n_outputs}); got "
                    f"values in [{int(y.min())}, {int(y.max())}]."
                )
            return y
        if self.likelihood is Likelihood.REGRESSION:
            if y.ndim == 1 and self.n_outputs == 1:
                return y.unsqueeze(-1)
            if y.ndim != 2 or y.shape[-1] != self.n_outputs:
                raise ValueError(
                    f"Regression targets must have shape (batch, {self.n_outputs}) "
                    f"to match the model output; got {tuple(y.shape)}."
                )
        return y

    def _check_finite_fit(self) -> None:
        if not torch.isfinite(torch.as_tensor(self.loss)).all():
            raise ValueError(
                f"The training loss is not finite ({float(self.loss)}): check the "
                "data for NaN/Inf and the model for divergence."
            )
        if not self._curvature_is_finite():
            raise ValueError(
                "The curvature contains NaN or Inf; check the data for NaN/Inf and "
                "the model for divergence."
            )

    def _curvature_is_finite(self) -> bool:
        return bool(torch.isfinite(self._H).all())

    def _before_accumulate(self, n_new: int) -> None:
        """Hook run before ``fit(..., override=False)`` adds ``n_new`` data points."""

    def _after_fit(self) -> None:
        """Hook run at the end of ``fit`` (e.g. to decompose the curvature)."""

    def _init_H(self) -> None:
        raise NotImplementedError

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    # ---- marginal likelihood ------------------------------------------------------
    @property
    def posterior_precision(self) -> Any:
        """The posterior precision, in the model's dtype."""
        return self._to_output(self._posterior_precision)

    @property
    def _posterior_precision(self) -> Any:
        raise NotImplementedError

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def log_det_prior_precision(self) -> torch.Tensor:
        return self.prior_precision_diag.log().sum()

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P - log det P_0``."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """``(value - prior_mean)^T P_0 (value - prior_mean)``."""
        delta = value - self.prior_mean
        return delta @ (self.prior_precision_diag * delta)

    @property
    def _prior_deviation(self) -> torch.Tensor:
        """``theta_MAP - prior_mean`` over the parameters the prior covers."""
        return self.mean - self.prior_mean

    @property
    def scatter(self) -> torch.Tensor:
        """``(theta_MAP - prior_mean)^T P_0 (theta_MAP - prior_mean)``."""
        delta = self._prior_deviation
        return delta @ (self.prior_precision_diag * delta)

    def _H_spectrum(self) -> tuple[torch.Tensor, int] | None:
        """Eigenvalues of ``H`` such that ``log det P = sum_i log(c lambda_i +
        delta_i)``, ``(n,)``, and the finest prior length for which this holds (1:
        scalar; ``n_layers``: eigenvalues in parameter-tensor order; ``n``: one per
        parameter), or ``None``. Used by the closed-form prior tuning."""
        return None

    def log_prob(self, value: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Log density of the posterior at ``value`` ``(n_params,)``."""
        self._check_fitted()
        delta = value - self.mean
        log_prob = -0.5 * self._precision_square_form(delta)
        if normalized:
            log_prob = log_prob + 0.5 * (
                self.log_det_posterior_precision
                - self.n_params * torch.log(torch.tensor(2 * torch.pi))
            )
        return log_prob

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Laplace approximation of the log marginal likelihood,
        ``log p(D | theta_MAP) - 1/2 (log det P - log det P_0 + scatter)``;
        differentiable w.r.t. ``prior_precision`` and ``sigma_noise``, which, when
        given, replace the current values.
        """
        self._check_fitted()
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if self.likelihood is not Likelihood.REGRESSION:
                raise ValueError("sigma_noise can only be set for regression.")
            self.sigma_noise = sigma_noise
        log_marglik = self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)
        return self._to_output(log_marglik)

    # ---- serialization ---------------------------------------------------------------
    def _H_state(self) -> Any:
        return self._H

    def _load_H_state(self, state: Any) -> None:
        self.H = state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the fitted posterior; only tensors, numbers
        and strings, so it loads with ``torch.load(..., weights_only=True)``."""
        self._check_fitted()
        return {
            "mean": self.mean,
            "H": self._H_state(),
            "loss": torch.as_tensor(self.loss),
            "prior_mean": self.prior_mean.detach(),
            "prior_precision": self.prior_precision.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "n_data": int(self.n_data),
            "n_outputs": int(self.n_outputs),
            "likelihood": self.likelihood.value,
            "temperature": float(self.temperature),
            "enable_backprop": self.enable_backprop,
            "n_params": int(self.n_params),
            "cls_name": type(self).__name__,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a posterior saved by :meth:`state_dict` of the same class, model
        and likelihood."""
        cls_name = state_dict.get("cls_name")
        if cls_name != type(self).__name__:
            raise ValueError(
                f"State dict was saved from {cls_name}, cannot load it into "
                f"{type(self).__name__}."
            )
        if state_dict["likelihood"] != self.likelihood.value:
            raise ValueError(
                f"State dict has likelihood={state_dict['likelihood']!r}, this "
                f"Laplace has {self.likelihood.value!r}."
            )
        self._prepare_load(state_dict)
        if state_dict["n_params"] != self.n_params:
            raise ValueError(
                f"State dict holds a posterior over {state_dict['n_params']} "
                f"parameters, this model has {self.n_params}: it comes from another "
                "model."
            )
        self.mean = state_dict["mean"].to(self._device, self._dtype)
        self._load_H_state(state_dict["H"])
        self.loss = state_dict["loss"].to(self._device, self._dtype)
        self.n_data = int(state_dict["n_data"])
        self.n_outputs = int(state_dict["n_outputs"])
        self.temperature = state_dict["temperature"]
        self.enable_backprop = bool(state_dict["enable_backprop"])
        self.sigma_noise = state_dict["sigma_noise"]
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self._after_fit()

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        """Hook for subclasses that need the state before the checks."""
