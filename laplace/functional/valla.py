"""VaLLA: variational linearised Laplace (Ortega et al., 2023, "Variational
linearized Laplace approximation for Bayesian deep learning").

A sparse variational GP with the NTK ``K(x, x') = J(x) J(x')^T / delta`` whose
mean is the network output at the MAP: the inducing outputs ``u = f(Z)`` (all
``O`` outputs of each inducing input, or one class each with
``inducing_classes``) get ``q(u) = N(f_MAP(Z), S)``, ``S = C L L^T C^T`` with
``C = chol(K0_ZZ)`` (whitened: the prior is ``L = I / sqrt(delta)``), so that

    cov(x) = (K0_xx - K0_xZ K0_ZZ^{-1} K0_Zx) / delta + A S A^T,
    A = K0_xZ K0_ZZ^{-1},  K0 = J J^T  (see :mod:`laplace.functional.sparse_gp`),

and the predictive mean is always the network output. ``L`` (packed lower
triangle), the log prior precision and (regression) the log noise variance are
learned by maximising the alpha-energy (:mod:`laplace.functional.alpha_energy`)
with Adam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from laplace.approximation import eval_mode
from laplace.checkpoint import (
    detached_copy,
    history_entry,
    inputs_entry,
    model_inputs_entry,
    tensor_entry,
)
from laplace.functional.alpha_energy import (
    check_alpha_arguments,
)
from laplace.functional.function_space import (
    BaseFunctionalLaplace,
    check_seed,
    check_zero_prior_mean,
    fit_method,
    positive_int,
)
from laplace.functional.inducing import (
    check_inducing_classes,
    check_inducing_locations,
    inducing_jacobians,
    resolve_inducing_locations,
)
from laplace.functional.sparse_gp import (
    conditional_parts,
    pack_lower,
    stable_cholesky,
    unpack_lower,
    variational_covariance,
)
from laplace.functional.valla_training import AlphaEnergyTraining
from laplace.signatures import VARIATIONAL, constructor
from laplace.utils.data import batch_size, dataset_size, select_rows, to_device

__all__ = ["VaLLA"]

_CHUNK = 256


class VaLLA(AlphaEnergyTraining, BaseFunctionalLaplace):
    """Variational linearised Laplace: a sparse GP with the NTK.

    Parameters
    ----------
    inducing_locations : Tensor, dict-like batch, 'random' or 'kmeans'
        The inducing inputs, or how to choose ``num_inducing`` of them from the
        training inputs (random points drawn with ``seed``, or k-means centres).
    num_inducing : int, optional
        Needed for 'random' and 'kmeans'.
    inducing_classes : LongTensor ``(M,)``, optional
        One output index per inducing input (``M`` inducing outputs instead of
        ``M * O``).
    alpha : float in [0, 1], default=1
        Alpha-divergence parameter; 0 is the ELBO.
    mc_softmax_samples : int, default=0
        Monte Carlo samples of the expected softmax likelihood; required (> 0) for
        classification with ``alpha != 1`` (``alpha = 1`` then uses the probit
        approximation).
    seed : int, default=0
        Seeds the inducing-point choice, the minibatch order of cached training
        terms and the Monte Carlo draws.
    Other parameters as :class:`~laplace.BaseLaplace` (scalar prior precision,
    zero prior mean); ``prior_precision`` and ``sigma_noise`` are the initial
    values of the learned ones. The temperature divides the data term.

    Attributes
    ----------
    L : Tensor ``(k (k + 1) / 2,)``
        Packed (row-major) lower triangle of the whitened factor of ``S``.
    log_prior_precision, log_noise_variance : Tensor ``()``
    fit_history_ : dict
        ``objective`` per Adam step, the minimised loss (the negative
        alpha-energy of the step's minibatch, as laplace-torch records it), and
        ``val_nll`` per validation check.
    """

    _key = ("all", "variational")
    _settings = (
        "alpha",
        "mc_softmax_samples",
        "seed",
    )
    _state_keys = ("inducing_inputs", "inducing_classes", "L", "fit_history")

    __init__ = constructor(VARIATIONAL)

    def _setup(self, options: dict[str, Any]) -> None:
        alpha, mc_softmax_samples = options["alpha"], options["mc_softmax_samples"]
        inducing_locations = options["inducing_locations"]
        num_inducing = options["num_inducing"]
        inducing_classes = options["inducing_classes"]
        self.alpha = check_alpha_arguments(alpha, mc_softmax_samples)
        self.mc_softmax_samples = mc_softmax_samples
        check_inducing_locations(inducing_locations, num_inducing)
        check_inducing_classes(inducing_classes)
        self.seed = check_seed(options["seed"])
        self.inducing_locations = inducing_locations
        self.num_inducing = num_inducing
        self.inducing_classes = inducing_classes
        self.L: torch.Tensor | None = None
        self.fit_history_: dict[str, list] = {"objective": [], "val_nll": []}
        super()._setup(options)
        if not self._learns_noise and self.alpha != 1 and not mc_softmax_samples:
            raise ValueError(
                f"Classification with alpha={self.alpha} needs mc_softmax_samples > 0 "
                "(only alpha=1 has a deterministic approximation)."
            )

    def _check_prior_mean_shape(self, prior_mean: torch.Tensor) -> None:
        check_zero_prior_mean(prior_mean, type(self).__name__)

    @property
    def _learns_noise(self) -> bool:
        return self._likelihood_model.has_noise

    @property
    def log_prior_precision(self) -> torch.Tensor:
        """Log of the (learned) scalar prior precision, ``()``."""
        return self.prior_precision.reshape(()).log()

    @property
    def log_noise_variance(self) -> torch.Tensor:
        """Log of the (learned) observation noise variance, ``()``."""
        return 2 * self.sigma_noise.log()

    # ---- fit ---------------------------------------------------------------------------
    @fit_method
    def fit(
        self,
        train_loader: Iterable,
        *,
        iterations: int = 100,
        lr: float = 1e-3,
        val_loader: Iterable | None = None,
        val_steps: int | None = None,
        progress_bar: bool = False,
        override: bool = True,
    ) -> None:
        """Learn ``L``, the prior precision and (regression) the noise variance
        with ``iterations`` Adam steps on minibatches of ``train_loader`` (of its
        batch size; drawn from cached kernel terms when the data set is small).

        ``override=False`` continues from the current state. With ``val_loader``
        the validation NLL is recorded every ``val_steps`` iterations and at the
        end in ``fit_history_['val_nll']``.
        """
        positive_int(iterations, "iterations")
        if val_steps is not None:
            positive_int(val_steps, "val_steps")
        self._check_first_batch(train_loader)
        n_total = dataset_size(train_loader)
        with eval_mode(self.model):
            if override or not self.is_fitted:
                Z = resolve_inducing_locations(
                    self.inducing_locations,
                    self.num_inducing,
                    train_loader,
                    self._batches,
                    self.seed,
                    self.dict_key_x,
                )
                self._set_inducing(to_device(Z, self._device))
                # start at the prior, S = K_ZZ = K0_ZZ / delta
                eye = torch.eye(len(self._J_Z), device=self._device, dtype=self._dtype)
                self.L = pack_lower(eye / self.prior_precision.sqrt())
                self.fit_history_ = {"objective": [], "val_nll": []}
            # appended to below: a new dict, so a failing fit keeps the old history
            self.fit_history_ = {k: list(v) for k, v in self.fit_history_.items()}
            self.n_data = n_total
            self.loss = self._training_loss(train_loader)
            if not torch.isfinite(self.loss):
                raise ValueError(
                    f"The training loss is not finite ({float(self.loss)}): check "
                    "the data for NaN/Inf and the model for divergence."
                )
            self._optimize(
                train_loader, iterations, lr, val_loader, val_steps, progress_bar
            )

    def _training_loss(self, loader: Iterable) -> torch.Tensor:
        loss = torch.zeros((), device=self._device, dtype=self._dtype)
        with torch.no_grad():
            for X, y in self._batches(loader):
                loss = loss + self._batch_loss(self.model(X).to(self._dtype), y)
        return loss

    def _set_inducing(self, Z: Any) -> None:
        """Jacobians ``(k, P)`` of the inducing outputs and the Cholesky factor of
        their Gram matrix."""
        n = batch_size(Z, self.dict_key_x)
        J = torch.cat(
            [
                self._jacobians(select_rows(Z, slice(s, s + _CHUNK), n))[0]
                for s in range(0, n, _CHUNK)
            ]
        )
        self.n_outputs = int(J.shape[1])
        self._inducing_inputs = Z
        self._J_Z = inducing_jacobians(J, self.inducing_classes)
        self._chol_K0 = stable_cholesky(self._J_Z @ self._J_Z.T)

    # ---- predictive ----------------------------------------------------------------------
    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        W, prior_cov = conditional_parts(Js, self._J_Z, self._chol_K0)
        L = unpack_lower(self.L, len(self._J_Z))
        delta = self.prior_precision.reshape(())
        return prior_cov / delta + variational_covariance(W, L)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        return self.functional_variance(Js.reshape(1, -1, Js.shape[-1]))[0]

    # ---- hyperparameters ---------------------------------------------------------------
    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError(
            "VaLLA has no Laplace marginal likelihood; its hyperparameters are "
            "learned in fit() by maximising the alpha-energy."
        )

    def optimize_prior_precision(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "VaLLA learns the prior precision in fit(); optimize_prior_precision is "
            "not available."
        )

    # ---- checkpoints --------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        Z, classes = self._inducing_inputs, self.inducing_classes
        return {
            "inducing_inputs": Z if isinstance(Z, torch.Tensor) else dict(Z),
            # an empty tensor stands for None
            "inducing_classes": torch.empty(0, dtype=torch.long)
            if classes is None
            else classes.detach().cpu(),
            "L": self.L.detach(),
            "fit_history": {k: list(v) for k, v in self.fit_history_.items()},
        }

    def _check_own_state(self, state_dict: dict[str, Any]) -> None:
        classes = state_dict["inducing_classes"]
        if not isinstance(classes, torch.Tensor):
            raise TypeError(
                "State dict entry 'inducing_classes' must be a tensor; got "
                f"{type(classes).__name__}."
            )
        check_inducing_classes(classes)
        inputs_entry(state_dict["inducing_inputs"], "inducing_inputs")
        L = tensor_entry(state_dict["L"], "L")
        if L.ndim != 1:
            raise ValueError(
                f"State dict entry 'L' must be a packed lower triangle (1-d); got "
                f"shape {tuple(L.shape)}."
            )
        history_entry(state_dict["fit_history"])

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        classes = state_dict["inducing_classes"].clone()
        self.inducing_classes = classes if classes.numel() else None
        Z = to_device(detached_copy(state_dict["inducing_inputs"]), self._device)
        self._check_model_outputs(Z)  # the model runs here for the first time
        with eval_mode(self.model), model_inputs_entry("inducing_inputs"):
            self._set_inducing(Z)
        k = len(self._J_Z)
        if state_dict["L"].shape != (k * (k + 1) // 2,):
            raise ValueError(
                f"L has shape {tuple(state_dict['L'].shape)}; {k} inducing outputs "
                f"need ({k * (k + 1) // 2},)."
            )
        self.L = tensor_entry(state_dict["L"], "L", like=self.prior_precision)
        self.fit_history_ = history_entry(state_dict["fit_history"])
