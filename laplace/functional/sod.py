"""Subset-of-data GP view of the linearised Laplace approximation (Immer et al.,
2021, "Improving predictions of Bayesian neural nets via local linearization").

With the GGN, the Laplace posterior of the linearised network is a GP with the
(scaled) NTK ``K(x, x') = J(x) J(x')^T / delta`` (isotropic prior precision
``delta``) conditioned on ``M`` training points with Gaussian "noise" of
precision ``c Lambda`` (``c = 1 / (sigma^2 T)``, ``Lambda`` the output Hessian of
the loss). Writing ``G = L^T J`` (``L L^T = Lambda``) for the ``M * O`` rows of the
subset and ``A = G G^T = Q diag(a) Q^T``:

- ``J* Sigma J*^T = (J* J*^T - U diag(1 / (delta / c + a)) U^T) / delta`` with
  ``U = J* G^T Q`` (Woodbury),
- ``log det P - log det P_0 = sum log(1 + c a / delta)`` (determinant lemma),

the same numbers as the weight-space FullLaplace with the same GGN when ``M = N``.
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from laplace.base import eval_mode
from laplace.curvature.curvature import GGNInterface
from laplace.functional.base import (
    BaseFunctionalLaplace,
    Inputs,
    _check_seed,
    _positive_int,
)
from laplace.utils.data import batch_size, dataset_size, to_device
from laplace.utils.enums import FeatureReduction, Likelihood
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.functional_utils import (
    concatenate_rows,
    preserve_model_gradients,
    select_rows,
    subset_loader,
    training_indices,
)
from laplace.utils.linalg import symeig

__all__ = ["FunctionalLaplace", "FunctionalLLLaplace"]

# rows of the subset per Jacobian evaluation when restoring a checkpoint
_CHUNK = 256


def _check_ggn_backend(backend: type | None, backend_kwargs: dict | None) -> None:
    if backend is not None and not (
        isinstance(backend, type)
        and (issubclass(backend, GGNInterface) or backend.__name__.endswith("GGN"))
    ):
        raise ValueError(
            f"The GP view needs a GGN backend (e.g. CurvlinopsGGN); got {backend!r}."
        )
    if (backend_kwargs or {}).get("stochastic", False):
        raise ValueError(
            "The GP view uses the exact GGN; backend_kwargs stochastic=True is not "
            "supported."
        )


class FunctionalLaplace(BaseFunctionalLaplace):
    """Laplace approximation in function space: a GP with the network's NTK,
    conditioned on a random subset of ``n_subset`` training points.

    Parameters
    ----------
    model, likelihood, sigma_noise, prior_precision, prior_mean, temperature,
    enable_backprop, dict_key_x, dict_key_y, backend, backend_kwargs
        As :class:`~laplace.BaseLaplace`; the prior precision is a scalar and the
        backend a GGN one (default ``CurvlinopsGGN``), used for its Jacobians.
    n_subset : int
        Number of training points the GP is conditioned on (subset of data).
    independent_outputs : bool, default=False
        One GP per output: the kernel and ``Lambda`` keep only their
        output-diagonal blocks (cheaper, an approximation for ``O > 1``).
    seed : int, default=0
        Seed of the subset draw.

    Notes
    -----
    The predictive mean is the network output at the MAP. The marginal
    likelihood is that of the subset (its loss, ``n_data = n_subset``); its
    scatter term is the weight-space one, ``delta ||theta_MAP - prior_mean||^2``.
    The Jacobians of the subset, ``(n_subset, O, P)``, are kept in memory.
    """

    _key = ("all", "gp")
    _state_keys = ("subset_inputs",)

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        self.n_subset = _positive_int(n_subset, "n_subset")
        self.seed = _check_seed(seed)
        self.independent_outputs = bool(independent_outputs)
        _check_ggn_backend(backend, backend_kwargs)
        self._G: torch.Tensor | None = None
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
        )

    # ---- fit ---------------------------------------------------------------------------
    @preserve_model_gradients
    def fit(self, train_loader: Iterable, progress_bar: bool = False) -> None:
        """Condition the GP on ``n_subset`` random points of ``train_loader``
        (``train_loader.dataset`` must be indexable)."""
        n_total = dataset_size(train_loader)
        self._before_fit(train_loader)
        indices = training_indices(n_total, self.n_subset, self.seed)
        batches = self._batches(subset_loader(train_loader, indices))
        if progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Functional Laplace fit")
        inputs, jacobians, outputs, loss = [], [], [], 0.0
        with eval_mode(self.model):
            for X, y in batches:
                Js, f = self._jacobians(X, enable_backprop=False)
                loss = loss + self._batch_loss(f, y)
                inputs.append(X)
                jacobians.append(Js)
                outputs.append(f)
        self.n_outputs = int(outputs[0].shape[-1])
        self._subset_inputs = concatenate_rows(inputs)
        self.loss, self.n_data = loss, self.n_subset
        self._refresh_mean()
        self._factorize(torch.cat(jacobians), torch.cat(outputs))

    def _before_fit(self, train_loader: Iterable) -> None:
        """Hook run before the subset pass (e.g. to find the last layer)."""

    def _factorize(self, J: torch.Tensor, f: torch.Tensor) -> None:
        """Keep ``G = L^T J`` ``(M, O, P)`` and the eigendecomposition of ``G G^T``
        (per output with ``independent_outputs``)."""
        L = self._lambda_sqrt(f)
        if self.independent_outputs:
            lam = torch.ones_like(f) if L is None else L.square().sum(-1)
            G = lam.sqrt().unsqueeze(-1) * J
            A = torch.einsum("mop,nop->omn", G, G)  # (O, M, M)
        else:
            G = J if L is None else torch.einsum("noc,nop->ncp", L, J)
            G_flat = G.reshape(-1, G.shape[-1])
            A = G_flat @ G_flat.T  # (M * O, M * O)
        self._G = G
        self._eigvals, self._eigvecs = symeig(0.5 * (A + A.mT))
        self._hyperparameters_changed()

    # ---- marginal likelihood -------------------------------------------------------------
    @property
    def _delta(self) -> torch.Tensor:
        return self.prior_precision.reshape(())

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """``log det P - log det P_0 = log det(I + c G G^T / delta)``, ``()``."""
        self._check_fitted()
        return torch.log1p(self._H_factor / self._delta * self._eigvals).sum()

    @property
    def scatter(self) -> torch.Tensor:
        """``delta ||theta_MAP - prior_mean||^2``, ``()``."""
        self._check_fitted()
        return self._delta * (self.mean - self.prior_mean).square().sum()

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``log p(D_M | theta_MAP) - 1/2 (log det ratio + scatter)`` of the subset
        ``D_M``; differentiable w.r.t. ``prior_precision`` and ``sigma_noise``,
        which, when given, replace the current values."""
        self._check_fitted()
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            if self.likelihood is not Likelihood.REGRESSION:
                raise ValueError("sigma_noise can only be set for regression.")
            self.sigma_noise = sigma_noise
        return self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)

    # ---- predictive ----------------------------------------------------------------------
    def _weights(self) -> torch.Tensor:
        """``1 / (delta / c + a)``, ``(M * O,)`` or ``(O, M)``."""
        return 1.0 / (self._delta / self._H_factor + self._eigvals)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if self.independent_outputs:
            U = torch.einsum("bop,mop->bom", Js, self._G)
            U = torch.einsum("bom,oml->bol", U, self._eigvecs)
            var = Js.square().sum(-1) - (U.square() * self._weights()).sum(-1)
            return torch.diag_embed(var / self._delta)
        G_flat = self._G.reshape(-1, self._G.shape[-1])
        U = (Js @ G_flat.T) @ self._eigvecs  # (batch, O, M * O)
        cov = Js @ Js.mT - (U * self._weights()) @ U.mT
        return cov / self._delta

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if not self.independent_outputs:
            return self.functional_variance(Js.reshape(1, -1, Js.shape[-1]))[0]
        U = torch.einsum("bop,mop->obm", Js, self._G)
        U = U @ self._eigvecs  # (O, batch, M)
        per_output = Js.transpose(0, 1) @ Js.permute(1, 2, 0)
        per_output = per_output - (U * self._weights().unsqueeze(1)) @ U.mT
        eye = torch.eye(Js.shape[1], device=Js.device, dtype=Js.dtype)
        cov = torch.einsum("obc,op->bocp", per_output, eye)
        n = Js.shape[0] * Js.shape[1]
        return cov.reshape(n, n) / self._delta

    # ---- checkpoints --------------------------------------------------------------------
    def _configuration(self) -> dict[str, Any]:
        return {
            **super()._configuration(),
            "n_subset": self.n_subset,
            "seed": self.seed,
            "independent_outputs": self.independent_outputs,
        }

    def _own_state(self) -> dict[str, Any]:
        X = self._subset_inputs
        return {"subset_inputs": X if isinstance(X, torch.Tensor) else dict(X)}

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        X = to_device(state_dict["subset_inputs"], self._device)
        n = batch_size(X, self.dict_key_x)
        jacobians, outputs = [], []
        with eval_mode(self.model):
            for start in range(0, n, _CHUNK):
                rows = select_rows(X, slice(start, start + _CHUNK), self.dict_key_x)
                Js, f = self._jacobians(rows, enable_backprop=False)
                jacobians.append(Js)
                outputs.append(f)
        self._subset_inputs = X
        self._factorize(torch.cat(jacobians), torch.cat(outputs))


class FunctionalLLLaplace(FunctionalLaplace):
    """:class:`FunctionalLaplace` over the last layer only: the GP inputs are the
    penultimate features of a deep copy of ``model`` (wrapped in a
    :class:`~laplace.utils.feature_extractor.FeatureExtractor`).

    Parameters
    ----------
    feature_reduction : FeatureReduction or str, optional
        'pick_first', 'pick_last' or 'average' for ``(batch, seq, dim)`` features.
    last_layer_name : str, optional
        Found on the first batch of ``fit`` when ``None``.
    """

    _key = ("last_layer", "gp")
    _state_keys = ("subset_inputs", "last_layer_name")

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_subset: int,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        last_layer_name: str | None = None,
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        independent_outputs: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        extractor = FeatureExtractor(
            deepcopy(model),
            last_layer_name=last_layer_name,
            enable_backprop=enable_backprop,
            feature_reduction=feature_reduction,
        )
        super().__init__(
            extractor,
            likelihood,
            n_subset,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            independent_outputs=independent_outputs,
            seed=seed,
        )

    def _init_params(self) -> None:
        if self.model.last_layer is None:
            # found on the first batch of fit()
            self.params, self.mean, self.n_params, self.n_layers = [], None, None, 0
            return
        super()._init_params()

    def _treated_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.last_layer.parameters() if p.requires_grad]

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return {**super()._backend_init_kwargs(), "last_layer": True}

    def _before_fit(self, train_loader: Iterable) -> None:
        if self.model.last_layer is not None:
            return
        X, _ = next(self._batches(train_loader), (None, None))
        if X is None:
            raise ValueError("train_loader yielded no batches.")
        with torch.no_grad():
            self.model.find_last_layer(X)
        self._backend = None
        self._init_params()

    def _jacobians(
        self, x: Inputs, enable_backprop: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backprop = self.enable_backprop if enable_backprop is None else enable_backprop
        Js, f = self.backend.last_layer_jacobians(x, enable_backprop=backprop)
        return Js.to(self._dtype), f.to(self._dtype)

    def _jacobians_and_output(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        # the last-layer Jacobians come with the outputs of one forward pass
        return self._jacobians(x)

    def _own_state(self) -> dict[str, Any]:
        return {**super()._own_state(), "last_layer_name": self.model.last_layer_name}

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        name = state_dict["last_layer_name"]
        if self.model.last_layer is None:
            self.model.set_last_layer(name)
            self._backend = None
            self._init_params()
        elif name != self.model.last_layer_name:
            raise ValueError(
                f"State dict was fitted on last layer {name!r}, this Laplace uses "
                f"{self.model.last_layer_name!r}."
            )
