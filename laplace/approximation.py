"""``BaseLaplace``: what every Laplace approximation shares -- the model,
likelihood and hyperparameters, transactions, the lazily built curvature
backend, data handling, the marginal likelihood and the tuning of the prior
precision. Weight-space classes are in :mod:`laplace.parametric`, function-space
ones in :mod:`laplace.functional`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from laplace.hyperparameters import HYPERPARAMETERS, HyperparametersMixin
from laplace.likelihoods import LikelihoodModel, likelihood_model
from laplace.signatures import BASE, constructor
from laplace.tuning import PriorTuningMixin
from laplace.utils.autograd_mode import ordinary_tensors
from laplace.utils.data import dataset_size, iterate_batches, split_batch, to_device
from laplace.utils.enums import Likelihood, PredType
from laplace.utils.eval_mode import eval_mode
from laplace.utils.utils import expand_to_parameters, trainable_parameters

__all__ = [
    "BaseLaplace",
    "MarginalLikelihoodMixin",
    "NotFittedError",
    "atomic",
    "eval_mode",
]

_Method = TypeVar("_Method", bound=Callable[..., Any])


class NotFittedError(ValueError, RuntimeError):
    """Raised when a method needs :meth:`fit` to have run first."""


def atomic(method: _Method) -> _Method:
    """Run ``method`` inside ``self._transaction()``: when it raises, the object
    is left exactly as it was (see :meth:`BaseLaplace._transaction`)."""

    @functools.wraps(method)
    def wrapper(self: BaseLaplace, *args: Any, **kwargs: Any) -> Any:
        with self._transaction():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class BaseLaplace(PriorTuningMixin, HyperparametersMixin):
    """Shared state of every Laplace approximation: the model, the likelihood and
    its hyperparameters (prior precision and mean, observation noise, temperature),
    the lazily built curvature backend and data handling.

    Parameters
    ----------
    model : nn.Module
    likelihood : Likelihood or {'classification', 'regression', 'reward_modeling'}
    sigma_noise : float or Tensor, default=1
        Observation noise standard deviation (regression only).
    prior_precision : float or Tensor, default=1
        Scalar, per-layer ``(n_layers,)`` or per-parameter ``(n_params,)``.
    prior_mean : float or Tensor, default=0
        Scalar or ``(n_params,)``.
    temperature : float, default=1
    enable_backprop : bool, default=False
        Keep predictions differentiable w.r.t. the inputs.
    dict_key_x, dict_key_y : str
        Keys of inputs and targets in dict-like batches.
    backend : type of CurvatureInterface, optional
        Defaults to :class:`~laplace.curvature.CurvlinopsGGN`.
    backend_kwargs : dict, optional
        Extra keyword arguments for the backend.
    asdl_fisher_kwargs : dict, optional
        Extra keyword arguments for ASDL's Fisher computation.
    """

    __init__ = constructor(BASE)

    def _setup(self, options: dict[str, Any]) -> None:
        """Set up from the bound constructor ``options`` (every keyword of
        :data:`laplace.signatures.KEYWORDS`, defaults filled in); subclasses
        extend it, reading the keywords they own."""
        model, likelihood = options["model"], options["likelihood"]
        backend_kwargs = options["backend_kwargs"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        for name, value in (("backend_kwargs", backend_kwargs),):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict or None; got {type(value)}.")
        self.model = model
        # laplace-torch's flag: only the parameters with requires_grad=True are
        # treated (some of the model's are frozen)
        self.is_subset_params = any(not p.requires_grad for p in model.parameters())
        self.enable_backprop = bool(options["enable_backprop"])
        self.dict_key_x = options["dict_key_x"]
        self.dict_key_y = options["dict_key_y"]
        self._backend_cls = options["backend"]
        self.backend_kwargs = dict(backend_kwargs or {})
        self.asdl_fisher_kwargs = options["asdl_fisher_kwargs"]
        self._backend = None
        self.loss: torch.Tensor | float = 0.0
        self.n_outputs: int | None = None
        self.n_data = 0
        self._set_device_dtype()
        for name in HYPERPARAMETERS:
            setattr(self, name, options[name])

    # ---- transactions ---------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Either the block completes or this object keeps the attributes it had:
        every attribute (re)assigned inside is restored when the block raises.

        Costs one shallow copy of the attribute dict. Code inside must build new
        tensors and containers rather than modify existing ones in place (fits
        accumulate into scratch state and commit at the end).
        """
        saved = dict(vars(self))
        try:
            yield
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise

    def _commit(self, state: dict[str, Any]) -> None:
        """Assign a new, complete state built on the side (by ``fit`` or
        ``load_state_dict``); cached values follow their inputs (see
        :mod:`laplace.utils.memo`)."""
        for name, value in state.items():
            setattr(self, name, value)

    # ---- model, device and backend -------------------------------------------
    def _set_device_dtype(self) -> None:
        param = next(iter(self.model.parameters()), None)
        if param is None:
            raise ValueError("The model has no parameters to build a posterior over.")
        self._device, self._dtype = param.device, param.dtype
        # what users get back: outputs follow the model (see _to_output)
        self._model_dtype = param.dtype
        # bf16/fp16 models: hyperparameters and curvature in float32 for stability.
        if self._dtype in (torch.bfloat16, torch.float16):
            self._dtype = torch.float32

    def _default_backend(self) -> type:
        from laplace.curvature import CurvlinopsGGN

        return CurvlinopsGGN

    @property
    def backend(self):
        """The curvature backend instance, built on first use."""
        if self._backend is None:
            self._backend = self._make_backend(
                self.model, self.likelihood, self._backend_init_kwargs()
            )
        return self._backend

    def _make_backend(
        self, model: nn.Module, likelihood: Any, kwargs: dict[str, Any] | None = None
    ) -> Any:
        """A backend of the configured class over ``model``; ``kwargs`` default
        to ``backend_kwargs``."""
        cls = self._backend_cls or self._default_backend()
        kwargs = self.backend_kwargs if kwargs is None else kwargs
        return cls(
            model,
            likelihood,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
            **kwargs,
        )

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return dict(self.backend_kwargs)

    def _to_output(self, value: Any) -> Any:
        """``value`` (a tensor, a ``Kron``/``KronDecomposed`` or a tuple/list of
        them) in the model's dtype: computations of half-precision models run in
        float32, what they return is in the model's dtype. Integer tensors and
        other values are returned as they are."""
        dtype = self._model_dtype
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype != dtype:
                return value.to(dtype)
            return value
        if isinstance(value, tuple | list):
            return type(value)(self._to_output(v) for v in value)
        if dtype != self._dtype and callable(getattr(value, "to", None)):
            return value.to(dtype)  # Kron, KronDecomposed
        return value

    # ---- hyperparameters --------------------------------------------------------
    def _as_tensor(self, value: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, device=self._device, dtype=self._dtype)

    @property
    def _H_factor(self) -> torch.Tensor:
        """Scale of the log-likelihood curvature, ``1 / (sigma^2 * temperature)``."""
        return 1.0 / (self.sigma_noise.square() * self.temperature)

    @property
    def _likelihood_model(self) -> LikelihoodModel:
        """What the likelihood means (loss, targets, predictions); see
        :mod:`laplace.likelihoods`."""
        return likelihood_model(self.likelihood)

    @property
    def log_likelihood(self) -> torch.Tensor:
        """Log-likelihood of the training data at the MAP, tempered.

        Regression: ``-loss / (sigma^2 T) - N * n_outputs * log(sigma sqrt(2 pi))``
        with ``loss`` half the sum of squared errors; classification: ``-loss / T``.
        """
        self._check_fitted()
        return self._likelihood_model.log_likelihood(
            self.loss, self.n_data, self.n_outputs, self.sigma_noise, self.temperature
        )

    # ---- data -----------------------------------------------------------------------
    def _batches(
        self, loader: Iterable
    ) -> Iterator[tuple[torch.Tensor | MutableMapping, torch.Tensor]]:
        """Yield ``(X, y)`` of every batch, on the model's device."""
        for batch in iterate_batches(loader):
            X, y = split_batch(batch, self.dict_key_y)
            # data made under torch.inference_mode() cannot enter autograd
            X, y = ordinary_tensors(X), ordinary_tensors(y)
            yield to_device(X, self._device), y.to(self._device)

    _dataset_size = staticmethod(dataset_size)

    def _check_targets(
        self, y: torch.Tensor, n_outputs: int | None = None
    ) -> torch.Tensor:
        """Check training or validation targets (see
        :meth:`laplace.likelihoods.LikelihoodModel.check_targets`); ``n_outputs``
        defaults to the model's, learned on the first batch of ``fit``."""
        return self._likelihood_model.check_targets(
            y, self.n_outputs if n_outputs is None else n_outputs
        )

    def _check_sampling_args(
        self, n_samples: Any, generator: Any, minimum: int = 1
    ) -> None:
        """``n_samples`` an int ``>= minimum`` (1 for Monte Carlo estimates, 0 for
        plain draws) and ``generator`` a ``torch.Generator`` or ``None``."""
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, int)
            or n_samples < minimum
        ):
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"n_samples must be {what}; got {n_samples!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None; got {type(generator)}."
            )

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet; call fit(train_loader) "
                "first."
            )

    @property
    def is_fitted(self) -> bool:
        return self.n_data > 0

    # ---- model outputs ----------------------------------------------------------------
    # Set once the model's outputs passed the checks of laplace.utils.model_checks
    # (first batch of fit, or first prediction of a posterior loaded from a state
    # dict, which has not seen the model run).
    _outputs_checked = False

    def _check_model_outputs(self, X: Any) -> int:
        """Check what the model computes on ``X``; return ``n_outputs``."""
        raise NotImplementedError

    def _check_outputs_once(self, x: Any) -> None:
        """Before the first prediction of a posterior that has not seen the model
        run, check the model's outputs on ``x``."""
        if self._outputs_checked:
            return
        with eval_mode(self.model), torch.no_grad():
            n_outputs = self._check_model_outputs(x)
        if n_outputs != self.n_outputs:
            self._outputs_checked = False
            raise ValueError(
                f"The model has {n_outputs} outputs, but the posterior was fitted "
                f"with n_outputs={self.n_outputs}: it comes from another model."
            )

    # ---- public API shared by all approximations -------------------------------
    # Implemented by the subclasses; here so that code written against
    # laplace-torch's BaseLaplace (type hints, subclasses) finds every method.
    def fit(self, train_loader: Iterable, *args: Any, **kwargs: Any) -> None:
        """Fit the approximation on ``train_loader``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement fit.")

    def __call__(self, x: torch.Tensor | MutableMapping, *args: Any, **kwargs: Any):
        """Predictive distribution at ``x``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement a predictive (__call__)."
        )

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Laplace approximation of the log marginal likelihood, ``()``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement log_marginal_likelihood."
        )

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Samples of the weights, ``(n_samples, n_params)``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no distribution over the weights to sample "
            "from; use functional_samples or predictive_samples."
        )

    def functional_samples(
        self, x: torch.Tensor | MutableMapping, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Samples of the network outputs at ``x``, ``(n_samples, batch, O)``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement functional_samples."
        )

    def _treated_parameters(self) -> list[nn.Parameter]:
        """The parameters the approximation is over (trainable ones by default)."""
        return trainable_parameters(self.model)

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """The prior precision expanded to one value per treated parameter,
        ``(n_params,)``."""
        params = getattr(self, "params", None)
        if params is None:
            params = self._treated_parameters()
        return expand_to_parameters(self.prior_precision, [p.numel() for p in params])

    def predictive(
        self,
        x: torch.Tensor | MutableMapping,
        pred_type: PredType | str = PredType.GLM,
        link_approx: str = "probit",
        n_samples: int = 100,
    ) -> Any:
        """Alias of ``__call__`` with the laplace-torch ``predictive`` signature."""
        return self(
            x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples
        )


class MarginalLikelihoodMixin:
    """The Laplace approximation of the log marginal likelihood, written once
    for the weight-space and function-space classes; they provide
    ``log_det_ratio`` and ``scatter``."""

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Laplace approximation of the log marginal likelihood,
        ``log p(D | theta_MAP) - 1/2 (log det P - log det P_0 + scatter)``, ``()``;
        differentiable w.r.t. ``prior_precision`` and ``sigma_noise``, which, when
        given, replace the current values."""
        self._check_fitted()
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if not self._likelihood_model.has_noise:
                raise ValueError("sigma_noise can only be set for regression.")
            self.sigma_noise = sigma_noise
        log_marglik = self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)
        return self._to_output(log_marglik)

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P - log det P_0``, ``()``."""
        raise NotImplementedError

    @property
    def scatter(self) -> torch.Tensor:
        """``(theta_MAP - prior_mean)^T P_0 (theta_MAP - prior_mean)``, ``()``."""
        raise NotImplementedError
