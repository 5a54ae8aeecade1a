"""``ParametricLaplace``: a Gaussian ``N(theta_MAP, P^{-1})`` over the weights,
written once over its pieces:

- a parameter selector (:mod:`laplace.selectors`): which parameters, their
  Jacobians or features;
- a posterior structure (:mod:`laplace.structures`): the shape of ``H`` and of
  ``P = H / (sigma^2 T) + prior``, with ``logdet``, square forms and samples;
- the likelihood object (:mod:`laplace.likelihoods`) and the curvature backend
  (:mod:`laplace.curvature`).

The public classes (``FullLaplace``, ``KronLLLaplace``, ...) only fix the
selector, the structure and their signature (:mod:`laplace.parametric.classes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from laplace.approximation import BaseLaplace, MarginalLikelihoodMixin, atomic
from laplace.distributed import all_reduce_max, all_reduce_sum, data_shard
from laplace.parametric.checkpoint import ParametricCheckpointMixin
from laplace.parametric.glm import GLMPredictiveMixin
from laplace.predictive.surface import PredictiveMixin
from laplace.selectors import AllWeights, ParameterSelector
from laplace.structures import Layout, PosteriorStructure, Precision
from laplace.tuning import Spectrum
from laplace.utils.autograd_mode import autograd_enabled
from laplace.utils.eval_mode import eval_mode
from laplace.utils.memo import Memo
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.utils import expand_to_parameters

__all__ = ["ParametricLaplace"]


class ParametricLaplace(
    ParametricCheckpointMixin,
    GLMPredictiveMixin,
    PredictiveMixin,
    MarginalLikelihoodMixin,
    BaseLaplace,
):
    """Laplace approximation in weight space; see :class:`BaseLaplace` for the
    constructor arguments. Only parameters with ``requires_grad=True`` are treated.

    Before :meth:`fit` the object holds the prior: ``mean`` is ``prior_mean`` and
    ``H`` a zero curvature of the final structure (allocated on first access).
    """

    #: the selector and structure classes a public class fixes
    _selector_type: ClassVar[type[ParameterSelector]] = AllWeights
    _structure_type: ClassVar[type[PosteriorStructure] | None] = None

    def _setup(self, options: dict[str, Any]) -> None:
        structure = self._structure_type
        self._structure = None if structure is None else structure(options)
        self._selector = self._selector_type(options)
        self._memo = Memo()
        self._layout: Layout | None = None
        self._first_batch: list | None = None
        self.n_params: int | None = None
        super()._setup({**options, "model": self._selector.model})
        self._init_params()

    # ---- parameters ----------------------------------------------------------------
    def _init_params(self) -> None:
        """Collect the treated parameters and check the prior against them."""
        self._layout = layout = self._selector.layout()
        if layout is None:  # found on the first batch of fit(); until then H is None
            self.params, self.mean, self.H = [], self.prior_mean, None
            return
        self.params = list(layout.params)
        self.n_layers = len(self.params)
        self._layer_sizes = [p.numel() for p in self.params]
        self.n_params = layout.n_params
        # re-validate hyperparameters now that the sizes are known
        self.prior_precision = self.prior_precision
        self.prior_mean = self.prior_mean
        # unfitted: the posterior is the prior
        self.mean = self.prior_mean
        self.H = None

    def _use_found_parameters(self) -> None:
        """Treat the parameters the selector just learned (new backend too)."""
        self._backend = None
        self._init_params()

    def _treated_parameters(self) -> list[torch.nn.Parameter]:
        return [] if self._layout is None else list(self._layout.params)

    def _backend_init_kwargs(self) -> dict[str, Any]:
        kwargs = super()._backend_init_kwargs()
        if self._structure is not None:
            kwargs = self._structure.backend_options(kwargs)
        return {**kwargs, **self._selector.backend_options()}

    def _prior_lengths(self, precision: bool) -> dict[int, str] | None:
        if self._layout is None:
            return None
        structure = self._structure
        if precision and structure is not None and not structure.per_parameter_prior:
            return {1: "scalar", self.n_layers: "one per layer"}
        return self._selector.prior_lengths(self._layout, precision)

    def _prior_precision_lengths(self) -> dict[int, str] | None:
        return self._prior_lengths(precision=True)

    def _prior_mean_lengths(self) -> dict[int, str] | None:
        return self._prior_lengths(precision=False)

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """The prior precision expanded to ``(n_params,)``."""
        if self._layout is None:
            return super().prior_precision_diag
        return expand_to_parameters(self.prior_precision, self._layout.groups)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # the selector may learn the parameters (the last layer) inside
        with self._selector.rollback(), super()._transaction():
            yield

    # ---- curvature -----------------------------------------------------------------
    @property
    def H(self) -> Any:
        """The curvature (log-likelihood Hessian approximation) in the model's
        dtype (kept as ``_H``, float32 for half-precision models). Before
        :meth:`fit` a zero object of the final structure, allocated on first
        access (``None`` while the treated parameters are unknown)."""
        if self._H is None and self.params:
            self._init_H()
        if self._H is None:
            return None
        return self._to_output(self._structure.public(self._H, self._memo))

    @H.setter
    def H(self, value: Any) -> None:
        self._H = value

    def _init_H(self) -> None:
        """Reset the curvature to zeros."""
        self._H = self._posterior_structure.zero(
            self._layout, self._device, self._dtype
        )

    @property
    def _posterior_structure(self) -> PosteriorStructure:
        if self._structure is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no posterior structure; use FullLaplace, "
                "KronLaplace, DiagLaplace, LowRankLaplace or their last-layer and "
                "subnetwork versions."
            )
        return self._structure

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
        an error of the model, ...) the object is exactly as before. An unknown
        last layer is found on the first batch (and forgotten again when the fit
        fails).

        Under an initialised ``torch.distributed`` process group with more than
        one rank, a loader with a ``DistributedSampler`` is a shard: loss and
        curvature are summed over all ranks (sampler padding dropped), so every
        rank gets the posterior of the whole data set; see
        :mod:`laplace.distributed` and docs/distributed.md.
        """
        structure = self._posterior_structure
        if not override and structure.continuation_error:
            raise ValueError(structure.continuation_error)
        try:
            if self._layout is None:
                X, _ = next(self._batches(train_loader), (None, None))
                if X is None:
                    raise ValueError("train_loader yielded no batches.")
                self._selector.find(X)
                self._use_found_parameters()
            self._fit(train_loader, override, progress_bar)
        finally:
            self._selector.forget_pass()

    def _fit(self, train_loader: Iterable, override: bool, progress_bar: bool) -> None:
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
        structure, layout = self._structure, self._layout
        # scratch: loss and curvature of the new data (never modified in place)
        loss, seen, first = 0.0, 0, None
        H = structure.accumulator(layout, self._device, self._dtype)
        with eval_mode(self.model):
            mean = self._parameter_vector()
            for X, y in batches:
                targets = self._prepare_batch(X, y)
                inputs = self._selector.curvature_inputs(X)
                backend = self._selector.curvature_backend(
                    self.backend, inputs, self._make_backend
                )
                loss_batch, H_batch = structure.batch(
                    backend, inputs, targets, n_total, self._dtype
                )
                loss = loss + loss_batch.detach().to(self._dtype)
                H = structure.add(H, H_batch)
                first = (X, y) if first is None else first
                seen += 1
            if shard is not None:
                loss, H, seen = self._reduce_across_ranks(loss, H, seen)
            if seen == 0:
                raise ValueError("train_loader yielded no batches.")
            if carry:
                loss = self.loss + loss
                H = structure.carried(self._H, self.n_data, n_new) + H
            self._check_finite_fit(loss, H)
            H = structure.finish(H, layout, self._device, self._dtype)
        keep = self._selector.keeps_first_batch
        self._commit(
            {
                "mean": mean,
                "loss": torch.as_tensor(loss, dtype=self._dtype, device=self._device),
                "n_data": n_total,
                "_first_batch": list(first) if keep else None,
                "_H": H,
            }
        )

    def _reduce_across_ranks(
        self, loss: Any, H: Any, seen: int
    ) -> tuple[torch.Tensor, Any, int]:
        """Loss, curvature and batch count of a sharded fit summed over all ranks
        (see :mod:`laplace.distributed`)."""
        loss = torch.as_tensor(loss, dtype=self._dtype, device=self._device)
        reduced = all_reduce_sum([loss.reshape(1), *self._structure.tensors(H)])
        # a rank without batches has not seen the outputs yet
        self.n_outputs = all_reduce_max(self.n_outputs or 0, self._device) or None
        H = self._structure.rebuild(H, reduced[1:])
        return reduced[0].reshape(()), H, all_reduce_max(seen, self._device)

    def _parameter_vector(self) -> torch.Tensor:
        """The treated parameters (the MAP) as a new vector ``(n_all,)``."""
        return parameters_to_vector(self.params).detach().to(self._dtype)

    def _prepare_batch(self, X: Any, y: torch.Tensor) -> torch.Tensor:
        """Check the model's outputs and learn ``n_outputs`` on the first batch;
        check the targets against it."""
        if self.n_outputs is None or not self._outputs_checked:
            self.n_outputs = self._check_model_outputs(X)
        return self._check_targets(y)

    def _check_model_outputs(self, X: Any) -> int:
        """Check the model's outputs on ``X`` (see model_checks); ``n_outputs``."""
        out = self._selector.checked_outputs(X, self.likelihood)
        self._outputs_checked = True
        # reward models output one reward per item; pairs give two logits
        return self._likelihood_model.n_outputs(out)

    def _check_outputs_once(self, x: Any) -> None:
        super()._check_outputs_once(x)
        self._selector.forget_pass()  # only fit reuses a pass

    def _check_finite_fit(self, loss: Any, H: Any) -> None:
        if not torch.isfinite(torch.as_tensor(loss)).all():
            raise ValueError(
                f"The training loss is not finite ({float(loss)}): check the "
                "data for NaN/Inf and the model for divergence."
            )
        if not self._structure.is_finite(H):
            raise ValueError(
                "The curvature contains NaN or Inf; check the data for NaN/Inf and "
                "the model for divergence."
            )

    # ---- posterior ----------------------------------------------------------------
    def _precision(self) -> Precision:
        """The posterior precision, computed once per curvature and
        hyperparameters (see :mod:`laplace.utils.memo`)."""
        self._check_fitted()
        H, structure, prior = self._H, self._structure, self.prior_precision
        inputs = (H, structure, self.sigma_noise, self.temperature, prior)

        def build() -> Precision:
            return structure.precision(
                H, self._H_factor, prior, self._layout, self._memo
            )

        return self._memo.get("precision", inputs, build)

    @property
    def posterior_precision(self) -> Any:
        """The posterior precision, in the model's dtype."""
        return self._to_output(self._precision().public)

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        return self._precision().logdet()

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
    def _posterior_mean(self) -> torch.Tensor:
        """The mean of the Gaussian, ``(n_params,)`` (a subnetwork's entries)."""
        return self._selector.coordinates(self.mean)

    @property
    def scatter(self) -> torch.Tensor:
        """``(theta_MAP - prior_mean)^T P_0 (theta_MAP - prior_mean)``."""
        delta = self._posterior_mean - self.prior_mean
        return delta @ (self.prior_precision_diag * delta)

    def _prior_spectrum(self, n_priors: int) -> Spectrum | None:
        """The closed form of the marginal-likelihood gradient for a prior of
        ``n_priors`` values (see :class:`laplace.tuning.Spectrum`), or ``None``."""
        found = self._structure.spectrum(self._H, self._memo)
        if found is None:
            return None
        eigenvalues, finest = found
        deviations = self._posterior_mean - self.prior_mean
        return Spectrum.grouped(
            self._H_factor * eigenvalues,
            finest,
            n_priors,
            self._layer_sizes,
            deviations.detach(),
            self._dtype,
        )

    def log_prob(self, value: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Log density of the posterior at ``value`` ``(n_params,)``; before
        :meth:`fit`, of the prior ``N(prior_mean, diag(prior_precision)^-1)``."""
        if not self.is_fitted:
            return self._prior_log_prob(value, normalized)
        delta = self._selector.coordinates(value) - self._posterior_mean
        log_prob = -0.5 * self._precision().quadratic(delta)
        if normalized:
            log_prob = log_prob + 0.5 * (
                self.log_det_posterior_precision
                - self.n_params * torch.log(torch.tensor(2 * torch.pi))
            )
        return log_prob

    def _prior_log_prob(self, value: torch.Tensor, normalized: bool) -> torch.Tensor:
        """``sum_i log N(value_i; prior_mean_i, 1 / prior_precision_i)`` (without
        the normalising constant unless ``normalized``)."""
        delta = self._selector.coordinates(value) - self.prior_mean
        if self.n_params is None:  # parameters unknown yet: a scalar prior
            precision = self.prior_precision.expand(delta.shape[-1])
        else:
            precision = self.prior_precision_diag
        log_prob = -0.5 * (precision * delta.square()).sum(-1)
        if normalized:
            log_2pi = torch.log(torch.tensor(2 * torch.pi, dtype=precision.dtype))
            log_prob = log_prob + 0.5 * (precision.log() - log_2pi).sum()
        return log_prob
