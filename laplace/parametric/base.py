"""``ParametricLaplace``: a Gaussian N(theta_MAP, P^{-1}) over the weights.

The structure of the posterior precision ``P`` (full, Kronecker-factored, diagonal)
is left to subclasses, which implement a handful of hooks:

- ``_zero_H`` / ``_curv_closure`` / ``_posterior_state``: accumulate curvature in
  ``fit`` (into scratch state, committed only when the fit completes),
- ``posterior_precision`` and ``log_det_posterior_precision``,
- ``_cov_square_form(W)``: ``W Sigma W^T`` for ``W`` of shape ``(batch, k, n_params)``,
- ``_sample_deviations(eps)``: ``Sigma^{1/2}`` applied to standard normal draws.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from laplace.base import BaseLaplace, atomic, eval_mode
from laplace.distributed import all_reduce_max, all_reduce_sum, data_shard
from laplace.parametric.checkpoint import ParametricCheckpointMixin
from laplace.parametric.prediction import ParametricPredictionMixin
from laplace.utils.autograd_mode import autograd_enabled
from laplace.utils.model_checks import check_model_output
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.utils import expand_to_parameters

__all__ = ["ParametricLaplace"]


class ParametricLaplace(
    ParametricCheckpointMixin, ParametricPredictionMixin, BaseLaplace
):
    """Laplace approximation in weight space; see :class:`BaseLaplace` for the
    constructor arguments. Only parameters with ``requires_grad=True`` are treated.

    Before :meth:`fit` the object holds the prior: ``mean`` is ``prior_mean`` and
    ``H`` a zero curvature of the final structure (allocated on first access).
    """

    _key: tuple[str, str] | None = None

    def _setup(self, options: dict[str, Any]) -> None:
        self.n_params: int | None = None
        super()._setup(options)
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
        # re-validate hyperparameters now that the sizes are known
        self.prior_precision = self.prior_precision
        self.prior_mean = self.prior_mean
        # unfitted: the posterior is the prior
        self.mean = self.prior_mean
        self.H = None

    def _prior_precision_lengths(self) -> dict[int, str] | None:
        if self.n_params is None:
            return None
        return {
            1: "scalar",
            self.n_layers: "one per layer",
            self.n_params: "one per parameter",
        }

    def _prior_mean_lengths(self) -> dict[int, str] | None:
        if self.n_params is None:
            return None
        return {1: "scalar", self.n_params: "one per parameter"}

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """The prior precision expanded to ``(n_params,)``."""
        return expand_to_parameters(self.prior_precision, self._layer_sizes)

    # ---- curvature -----------------------------------------------------------------
    @property
    def H(self) -> Any:
        """The curvature (log-likelihood Hessian approximation) in the model's
        dtype (kept as ``_H``, float32 for half-precision models). Before
        :meth:`fit` a zero object of the final structure, allocated on first
        access (``None`` while the treated parameters are unknown)."""
        if self._H is None and self.params:
            self._H = self._zero_H()
        return self._to_output(self._H)

    @H.setter
    def H(self, value: Any) -> None:
        self._H = value

    def _init_H(self) -> None:
        """Reset the curvature to zeros."""
        self.H = self._zero_H()

    def _zero_H(self) -> Any:
        """A zero curvature of this structure."""
        raise NotImplementedError

    def _zero_accumulator(self) -> Any:
        """Where ``fit`` starts summing the batches' curvature."""
        return self._zero_H()

    # ---- fit --------------------------------------------------------------------------
    @atomic
    @autograd_enabled
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
        The batches are checked and summed into scratch state; only a fit that
        completes replaces the posterior. When it raises (bad targets, NaN/Inf,
        an error of the model, ...) the object is exactly as before.

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
        carry = not override and self.is_fitted
        n_total = n_new + (self.n_data if carry else 0)
        batches = self._batches(train_loader)
        if shard is not None:
            batches = shard.unpadded(batches, self.dict_key_x)
        if progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Laplace fit")
        # scratch: loss and curvature of the new data (never modified in place)
        loss, H, seen, first = 0.0, self._zero_accumulator(), 0, None
        with eval_mode(self.model):
            mean = self._parameter_vector()
            for X, y in batches:
                X, targets = self._prepare_batch(X, y)
                loss_batch, H_batch = self._curv_closure(X, targets, n_total)
                loss = loss + loss_batch.detach().to(self._dtype)
                H = H + H_batch
                first = (X, y) if first is None else first
                seen += 1
        if shard is not None:
            loss, H, seen = self._reduce_across_ranks(loss, H, seen)
        if seen == 0:
            raise ValueError("train_loader yielded no batches.")
        if carry:
            loss, H = self.loss + loss, self._carried_H(n_new) + H
        self._check_finite_fit(loss, H)
        self._commit(
            {
                "mean": mean,
                "loss": torch.as_tensor(loss, dtype=self._dtype, device=self._device),
                "n_data": n_total,
                **self._first_batch_state(first),
                **self._posterior_state(H),
            }
        )

    def _posterior_state(self, H: Any) -> dict[str, Any]:
        """Attributes of the posterior with summed curvature ``H`` (structures
        that decompose ``H`` do it here, before anything is assigned)."""
        return {"H": H}

    def _first_batch_state(self, batch: tuple[Any, torch.Tensor]) -> dict[str, Any]:
        """Attributes kept from the first training batch ``(X, y)`` (last-layer
        checkpoints save it)."""
        return {}

    def _carried_H(self, n_new: int) -> Any:
        """The current curvature, to be added to that of ``n_new`` new data points
        (``fit(..., override=False)``)."""
        return self._H

    def _reduce_across_ranks(
        self, loss: Any, H: Any, seen: int
    ) -> tuple[torch.Tensor, Any, int]:
        """Loss, curvature and batch count of a sharded fit summed over all ranks
        (see :mod:`laplace.distributed`)."""
        loss = torch.as_tensor(loss, dtype=self._dtype, device=self._device)
        reduced = all_reduce_sum([loss.reshape(1), *self._curvature_tensors(H)])
        # a rank without batches has not seen the outputs yet
        self.n_outputs = all_reduce_max(self.n_outputs or 0, self._device) or None
        H = self._rebuild_curvature(H, reduced[1:])
        return reduced[0].reshape(()), H, all_reduce_max(seen, self._device)

    def _curvature_tensors(self, H: Any) -> list[torch.Tensor]:
        """The accumulated curvature as tensors (for ``all_reduce``)."""
        if not isinstance(H, torch.Tensor):
            raise NotImplementedError(
                f"{type(self).__name__} does not support distributed fitting."
            )
        return [H]

    def _rebuild_curvature(self, H: Any, tensors: list[torch.Tensor]) -> Any:
        """Curvature like ``H`` made of ``tensors`` (from ``_curvature_tensors``)."""
        (H,) = tensors
        return H

    def _parameter_vector(self) -> torch.Tensor:
        """The treated parameters (the MAP) as a new vector ``(n_params,)``."""
        return parameters_to_vector(self.params).detach().to(self._dtype)

    def _model_outputs(self, X: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model(X)

    def _prepare_batch(self, X: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Check the model's outputs and learn ``n_outputs`` on the first batch;
        check the targets against it."""
        if self.n_outputs is None or not self._outputs_checked:
            self.n_outputs = self._check_model_outputs(X)
        return X, self._check_targets(y)

    def _check_model_outputs(self, X: Any) -> int:
        """Check the model's outputs on ``X`` (see model_checks); ``n_outputs``."""
        out = check_model_output(self._laplace_outputs(X), self.likelihood)
        self._outputs_checked = True
        # reward models output one reward per item; pairs give two logits
        return self._likelihood_model.n_outputs(out)

    def _laplace_outputs(self, X: Any) -> Any:
        """The outputs to linearise, after checks particular to the subset."""
        return self._model_outputs(X)

    def _check_finite_fit(self, loss: Any, H: Any) -> None:
        if not torch.isfinite(torch.as_tensor(loss)).all():
            raise ValueError(
                f"The training loss is not finite ({float(loss)}): check the "
                "data for NaN/Inf and the model for divergence."
            )
        if not self._curvature_is_finite(H):
            raise ValueError(
                "The curvature contains NaN or Inf; check the data for NaN/Inf and "
                "the model for divergence."
            )

    def _curvature_is_finite(self, H: Any) -> bool:
        return bool(torch.isfinite(H).all())

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
        """Log density of the posterior at ``value`` ``(n_params,)``; before
        :meth:`fit`, of the prior ``N(prior_mean, diag(prior_precision)^-1)``."""
        if not self.is_fitted:
            return self._prior_log_prob(value, normalized)
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

    def _prior_log_prob(self, value: torch.Tensor, normalized: bool) -> torch.Tensor:
        """``sum_i log N(value_i; prior_mean_i, 1 / prior_precision_i)`` (without
        the normalising constant unless ``normalized``)."""
        delta = self._prior_coordinates(value) - self.prior_mean
        if self.n_params is None:  # parameters unknown yet: a scalar prior
            precision = self.prior_precision.expand(delta.shape[-1])
        else:
            precision = self.prior_precision_diag
        log_prob = -0.5 * (precision * delta.square()).sum(-1)
        if normalized:
            log_2pi = torch.log(torch.tensor(2 * torch.pi, dtype=precision.dtype))
            log_prob = log_prob + 0.5 * (precision.log() - log_2pi).sum()
        return log_prob

    def _prior_coordinates(self, value: torch.Tensor) -> torch.Tensor:
        """The entries of ``value`` that the prior covers."""
        return value

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
            if not self._likelihood_model.has_noise:
                raise ValueError("sigma_noise can only be set for regression.")
            self.sigma_noise = sigma_noise
        log_marglik = self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)
        return self._to_output(log_marglik)
