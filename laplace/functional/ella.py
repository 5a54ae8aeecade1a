"""ELLA: accelerated linearised Laplace with Nystrom NTK features (Deng et al.,
2022, "Accelerated linearized Laplace approximation for Bayesian deep learning").

A random subsample of ``M`` training points gives the Gram matrix of the NTK
``J_s J_s^T = U diag(lambda) U^T`` over one random output of each point (as
laplace-torch does; or over all ``M * O`` outputs). Its top ``k``
eigenpairs define ``k`` orthonormal parameter directions
``V = J_s^T U diag(lambda)^{-1/2}`` (``dual_directions``, ``(P, k)``) and the
features ``phi(x) = J(x) V`` ``(O, k)``, computed with ``k`` Jacobian-vector
products. The linearised network restricted to these directions,
``f(x) = f_MAP(x) + phi(x) w`` with ``w ~ N(0, I / delta)``, has the posterior
precision ``c * feature_gram + delta I`` (``feature_gram = sum_n phi_n^T Lambda_n
phi_n`` over the training data, ``c = 1 / (sigma^2 T)``), whose Cholesky factor is
``chol_precision``; the predictive covariance is ``phi(x) (c G + delta I)^{-1}
phi(x)^T``. With all eigenpairs of a Gram matrix of rank ``P`` this is the exact
linearised Laplace predictive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from laplace.approximation import eval_mode
from laplace.checkpoint import history_entry, symmetric_entry, tensor_entry
from laplace.functional.function_space import (
    BaseFunctionalLaplace,
    check_seed,
    check_zero_prior_mean,
    fit_method,
    positive_int,
)
from laplace.functional.nystrom import (
    NYSTROM_OUTPUTS,
    jvp_features,
    nystrom_directions,
    nystrom_rows,
)
from laplace.predictive.surface import Inputs
from laplace.signatures import NYSTROM, constructor
from laplace.tuning import tuning_method
from laplace.utils.data import dataset_size
from laplace.utils.enums import PredType, TuningMethod
from laplace.utils.subsets import balanced_indices, random_subset_indices, subset_loader

__all__ = ["ELLA"]


class ELLA(BaseFunctionalLaplace):
    """Linearised Laplace on Nystrom features of the NTK.

    Parameters
    ----------
    subsample_size : int
        Training points ``M`` of the Nystrom subsample.
    n_eigenvalues : int
        Eigenpairs ``k <= subsample_size`` kept (feature dimension).
    prior_precision : float, default=1
        Scalar only; ``prior_mean`` must be 0.
    seed : int, default=1234
        Seed of the subsample draw (and of the outputs picked for it).
    nystrom_outputs : {'random', 'all'}, default='random'
        Rows of the subsample's Jacobians that span the Nystrom basis: one
        random output per subsampled point (laplace-torch's choice, an ``M x M``
        Gram matrix), or all ``O`` outputs of each point (``M O x M O``: a
        richer basis for the same subsample, at ``O^2`` times the cost of the
        eigendecomposition).
    Other parameters as :class:`~laplace.BaseLaplace`.

    Attributes
    ----------
    dual_directions : Tensor ``(P, k)``
    feature_gram : Tensor ``(k, k)``
    chol_precision : Tensor ``(k, k)``
    fit_history_ : dict
        ``processed_examples`` and ``val_nll`` of the validation checks during
        ``fit``, ``tuning`` of :meth:`optimize_hyperparameters`.
    """

    _key = ("all", "nystrom")
    _settings = (
        "subsample_size",
        "n_eigenvalues",
        "seed",
        "nystrom_outputs",
    )
    _state_keys = ("dual_directions", "feature_gram", "fit_history")

    __init__ = constructor(NYSTROM, seed=1234)

    def _setup(self, options: dict[str, Any]) -> None:
        subsample_size = options["subsample_size"]
        n_eigenvalues = options["n_eigenvalues"]
        self.subsample_size = positive_int(subsample_size, "subsample_size")
        self.n_eigenvalues = positive_int(n_eigenvalues, "n_eigenvalues")
        if n_eigenvalues > subsample_size:
            raise ValueError(
                f"n_eigenvalues={n_eigenvalues} must not exceed "
                f"subsample_size={subsample_size}."
            )
        self.seed = check_seed(options["seed"])
        nystrom_outputs = options["nystrom_outputs"]
        if nystrom_outputs not in NYSTROM_OUTPUTS:
            raise ValueError(
                f"nystrom_outputs must be one of {list(NYSTROM_OUTPUTS)}; got "
                f"{nystrom_outputs!r}."
            )
        self.nystrom_outputs = nystrom_outputs
        self.dual_directions: torch.Tensor | None = None
        self.feature_gram: torch.Tensor | None = None
        self.fit_history_: dict[str, list] = {
            "processed_examples": [],
            "val_nll": [],
            "tuning": [],
        }
        super()._setup(options)

    def _check_prior_mean_shape(self, prior_mean: torch.Tensor) -> None:
        check_zero_prior_mean(prior_mean, type(self).__name__)

    # ---- fit ---------------------------------------------------------------------------
    @fit_method
    def fit(
        self,
        train_loader: Iterable,
        *,
        val_loader: Iterable | None = None,
        val_steps: int | None = None,
        balanced: bool = False,
        progress_bar: bool = False,
    ) -> None:
        """Build the Nystrom features on a subsample, then accumulate
        ``feature_gram`` over ``train_loader``.

        With ``val_loader``, the validation NLL is recorded every ``val_steps``
        batches (and after the last one) and the state with the lowest one is
        kept (early stopping). ``balanced=True`` draws a class-balanced subsample
        (classification).
        """
        self._check_first_batch(train_loader)
        n_total = dataset_size(train_loader)
        if self.subsample_size > n_total:
            raise ValueError(
                f"subsample_size={self.subsample_size} exceeds the number of "
                f"training points {n_total}."
            )
        if val_steps is not None:
            positive_int(val_steps, "val_steps")
        indices = self._subsample(train_loader, n_total, balanced)
        with eval_mode(self.model):
            subset = subset_loader(train_loader, indices)
            J = torch.cat(
                [self._jacobians(X, False)[0] for X, _ in self._batches(subset)]
            )
            self.n_outputs = int(J.shape[1])
            rows = nystrom_rows(J, self.nystrom_outputs, self.seed)
            self.dual_directions = nystrom_directions(rows, self.n_eigenvalues)
            del J
            self._accumulate(train_loader, val_loader, val_steps, progress_bar)

    def _subsample(
        self, loader: Iterable, n_total: int, balanced: bool
    ) -> torch.Tensor:
        if not balanced:
            return random_subset_indices(n_total, self.subsample_size, self.seed)
        if not self._likelihood_model.class_targets:
            raise ValueError("balanced=True needs a classification likelihood.")
        ordered = subset_loader(loader, range(n_total))
        targets = torch.cat([y.reshape(-1).cpu() for _, y in self._batches(ordered)])
        return balanced_indices(targets, self.subsample_size, self.seed)

    def _accumulate(
        self,
        loader: Iterable,
        val_loader: Iterable | None,
        val_steps: int | None,
        progress_bar: bool,
    ) -> None:
        k = self.dual_directions.shape[1]
        gram = torch.zeros(k, k, device=self._device, dtype=self._dtype)
        loss, processed, best = 0.0, 0, None
        self.fit_history_ = {"processed_examples": [], "val_nll": [], "tuning": []}
        batches = self._batches(loader)
        if progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="ELLA fit")
        step = 0
        for step, (X, y) in enumerate(batches, 1):
            f, phi = self._features(X)
            loss = loss + self._batch_loss(f, y)
            L = self._lambda_sqrt(f)
            M = phi if L is None else torch.einsum("boc,bok->bck", L, phi)
            gram = gram + torch.einsum("bck,bcl->kl", M, M)
            processed += len(y)
            self.feature_gram, self.loss, self.n_data = gram, loss, processed
            periodic = val_steps is not None and step % val_steps == 0
            if val_loader is not None and periodic:
                best = self._check_validation(val_loader, best)
        if step == 0:
            raise ValueError("train_loader yielded no batches.")
        if val_loader is not None and not (val_steps and step % val_steps == 0):
            best = self._check_validation(val_loader, best)
        if best is not None:
            self.feature_gram, self.loss, self.n_data = best[1:]
        if not (
            torch.isfinite(self.loss).all() and torch.isfinite(self.feature_gram).all()
        ):
            raise ValueError(
                "The training loss or the feature Gram matrix contains NaN or Inf; "
                "check the data for NaN/Inf and the model for divergence."
            )

    def _check_validation(self, val_loader: Iterable, best: tuple | None) -> tuple:
        nll = self._validation_nll(val_loader)
        self.fit_history_["processed_examples"].append(int(self.n_data))
        self.fit_history_["val_nll"].append(nll)
        if best is None or nll < best[0]:
            best = (nll, self.feature_gram.clone(), self.loss, self.n_data)
        return best

    # ---- features and predictive ------------------------------------------------------
    def _features(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs ``(batch, O)`` and features ``J(x) V`` ``(batch, O, k)`` via
        Jacobian-vector products (no ``(batch, O, P)`` Jacobian)."""
        f, phi = jvp_features(
            self.model, self.backend.params_dict, self.dual_directions, x
        )
        return f.to(self._dtype), phi.to(self._dtype)

    @property
    def chol_precision(self) -> torch.Tensor:
        """Lower Cholesky factor of ``c * feature_gram + delta I``, ``(k, k)``."""
        self._check_fitted()
        gram, prior = self.feature_gram, self.prior_precision
        inputs = (gram, self.sigma_noise, self.temperature, prior)

        def compute() -> torch.Tensor:
            eye = torch.eye(len(gram), device=gram.device, dtype=gram.dtype)
            return torch.linalg.cholesky(self._H_factor * gram + prior * eye)

        return self._memo.get("chol_precision", inputs, compute)

    def _feature_covariance(self, phi: torch.Tensor, joint: bool) -> torch.Tensor:
        """``phi (c G + delta I)^{-1} phi^T`` per input ``(batch, O, O)`` or joint."""
        batch, n_out, k = phi.shape
        Z = torch.linalg.solve_triangular(
            self.chol_precision, phi.reshape(-1, k).T, upper=False
        )
        if joint:
            return Z.T @ Z
        Z = Z.reshape(k, batch, n_out)
        return torch.einsum("kbo,kbp->bop", Z, Z)

    def _gp_moments(self, x: Inputs, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        f, phi = self._features(x)
        cov = self._feature_covariance(phi, joint)
        return (f.flatten(), cov) if joint else (f, cov)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self._feature_covariance(Js @ self.dual_directions, joint=False)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self._feature_covariance(Js @ self.dual_directions, joint=True)

    # ---- hyperparameters ---------------------------------------------------------------
    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(
            "ELLA has no marginal likelihood; tune the prior precision with "
            "optimize_prior_precision(method='gridsearch', val_loader=...) or "
            "optimize_hyperparameters(val_loader, grid)."
        )

    optimize_prior_precision = tuning_method(PredType.GP, "gridsearch")

    def _check_tuning(self, pred_type: Any, method: Any, prior_structure: Any) -> Any:
        # ELLA has no marginal likelihood: a grid search of the scalar prior
        if TuningMethod.parse(method, "method") is TuningMethod.MARGLIK:
            raise NotImplementedError(
                "ELLA has no marginal likelihood; use method='gridsearch' with a "
                "val_loader."
            )
        return super()._check_tuning(pred_type, method, prior_structure)

    def _default_tuning_loss(self) -> Any:
        """Without ``loss``, each grid point is scored by the validation negative
        log predictive density: of the probabilities (``link_approx``) for
        classification, of ``N(f_mu, f_var + sigma_noise^2)`` for regression
        (the mean squared error would not depend on the prior: ELLA's mean is
        the network output)."""
        if self._likelihood_model.has_noise:
            return self._gaussian_nll
        return super()._default_tuning_loss()

    def _gaussian_nll(
        self, f_mu: torch.Tensor, f_var: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Mean negative log density of targets ``y`` ``(n, O)`` under
        ``N(f_mu, f_var + sigma_noise^2 I)`` (``f_var`` ``(n, O, O)``), ``()``."""
        eye = torch.eye(f_mu.shape[-1], device=f_mu.device, dtype=f_mu.dtype)
        cov = f_var + self.sigma_noise.square().to(f_mu.dtype) * eye
        dist = torch.distributions.MultivariateNormal(f_mu, covariance_matrix=cov)
        return -dist.log_prob(y.to(f_mu.dtype)).mean()

    def optimize_hyperparameters(
        self, val_loader: Iterable, grid: Iterable[Any]
    ) -> dict[str, float]:
        """Pick the prior precision, or ``(prior_precision, sigma_noise)`` pair, of
        ``grid`` with the lowest validation NLL; every score is appended to
        ``fit_history_['tuning']``. Returns the best entry."""
        self._check_fitted()
        best = None
        for entry in grid:
            prior, sigma = entry if isinstance(entry, tuple | list) else (entry, None)
            self.prior_precision = prior
            if sigma is not None:
                self.sigma_noise = sigma
            record = {
                "prior_precision": float(self.prior_precision),
                "sigma_noise": float(self.sigma_noise),
            }
            try:
                record["val_nll"] = self._validation_nll(val_loader)
            except torch.linalg.LinAlgError:
                record["val_nll"] = float("inf")
            self.fit_history_["tuning"].append(record)
            if best is None or record["val_nll"] < best["val_nll"]:
                best = record
        if best is None:
            raise ValueError("grid is empty.")
        self.prior_precision = best["prior_precision"]
        self.sigma_noise = best["sigma_noise"]
        return dict(best)

    # ---- checkpoints --------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        return {
            "dual_directions": self.dual_directions.detach(),
            "feature_gram": self.feature_gram.detach(),
            "fit_history": {k: list(v) for k, v in self.fit_history_.items()},
        }

    def _check_own_state(self, state_dict: dict[str, Any]) -> None:
        V = tensor_entry(state_dict["dual_directions"], "dual_directions")
        if V.ndim != 2 or V.shape[0] != self.n_params:
            raise ValueError(
                f"State dict entry 'dual_directions' has shape {tuple(V.shape)}; the "
                f"model has {self.n_params} parameters, so (n_params, k) is needed."
            )
        if not 1 <= V.shape[1] <= self.n_eigenvalues:
            raise ValueError(
                f"State dict entry 'dual_directions' has {V.shape[1]} columns; "
                f"n_eigenvalues={self.n_eigenvalues} allows 1 to {self.n_eigenvalues}."
            )
        k = V.shape[1]
        gram = tensor_entry(state_dict["feature_gram"], "feature_gram", (k, k))
        symmetric_entry(gram, "feature_gram")
        history_entry(state_dict["fit_history"])

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        like = self.prior_precision
        self._commit(
            {
                "dual_directions": tensor_entry(
                    state_dict["dual_directions"], "dual_directions", like=like
                ),
                "feature_gram": tensor_entry(
                    state_dict["feature_gram"], "feature_gram", like=like
                ),
                "fit_history_": history_entry(state_dict["fit_history"]),
            }
        )
