"""Subset-of-data GP view of the linearised Laplace approximation (Immer et al.,
2021, "Improving predictions of Bayesian neural nets via local linearization").

With the GGN, the Laplace posterior of the linearised network is a GP with the
(scaled) NTK ``K(x, x') = J(x) J(x')^T / delta`` (isotropic prior precision
``delta``) conditioned on ``M`` training points with Gaussian "noise" of
precision ``c Lambda`` (``c = 1 / (sigma^2 T)``, ``Lambda`` the output Hessian of
the loss). Writing ``L`` (``L L^T = Lambda``) for the block diagonal of the
subset's ``M * O`` outputs, ``K_MM = J J^T`` for its kernel and
``A = L^T K_MM L = Q diag(a) Q^T``:

- ``J* Sigma J*^T = (K_** - U diag(1 / (delta / c + a)) U^T) / delta`` with
  ``U = K_*M L Q`` (Woodbury),
- ``log det P - log det P_0 = sum log(1 + c a / delta)`` (determinant lemma),

the same numbers as the weight-space FullLaplace with the same GGN when ``M = N``.
The kernels come from the extension points of
:class:`~laplace.functional.ntk.NTKKernels`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from laplace.approximation import eval_mode
from laplace.checkpoint import detached_copy, inputs_entry, model_inputs_entry
from laplace.curvature.curvature import GGNInterface
from laplace.functional.function_space import (
    BaseFunctionalLaplace,
    check_seed,
    fit_method,
    positive_int,
)
from laplace.functional.ntk import NTKKernels
from laplace.signatures import SUBSET_OF_DATA, constructor
from laplace.utils.data import (
    batch_size,
    concatenate_rows,
    dataset_size,
    select_rows,
    to_device,
)
from laplace.utils.linalg import symeig
from laplace.utils.subsets import sod_indices, subset_loader

__all__ = ["FunctionalLaplace"]

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


class FunctionalLaplace(NTKKernels, BaseFunctionalLaplace):
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
        Seed of the subset draw: ``numpy.random.default_rng(seed).choice(N,
        n_subset, replace=False)``, the subset laplace-torch picks.

    Notes
    -----
    The predictive mean is the network output at the MAP. The marginal
    likelihood is that of the subset (its loss, ``n_data = n_subset``); its
    scatter term is the weight-space one, ``delta ||theta_MAP - prior_mean||^2``.
    The Jacobians of the subset, ``(n_subset, O, P)``, are kept in memory.
    """

    _key = ("all", "gp")
    _settings = (
        "n_subset",
        "seed",
        "independent_outputs",
    )
    _state_keys = ("subset_inputs",)

    __init__ = constructor(SUBSET_OF_DATA)

    def _setup(self, options: dict[str, Any]) -> None:
        self.n_subset = positive_int(options["n_subset"], "n_subset")
        self.seed = check_seed(options["seed"])
        self.independent_outputs = bool(options["independent_outputs"])
        _check_ggn_backend(options["backend"], options["backend_kwargs"])
        self._J_subset: torch.Tensor | None = None
        self._L_subset: torch.Tensor | None = None
        super()._setup(options)

    # ---- fit ---------------------------------------------------------------------------
    @fit_method
    def fit(self, train_loader: Iterable, progress_bar: bool = False) -> None:
        """Condition the GP on ``n_subset`` random points of ``train_loader``
        (``train_loader.dataset`` must be indexable); see
        :meth:`_get_SoD_data_loader`. Only a fit that completes changes the
        object."""
        self._check_first_batch(train_loader)
        batches = self._batches(self._get_SoD_data_loader(train_loader))
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
        if not outputs:
            raise ValueError("The subset-of-data loader yielded no batches.")
        J, f = torch.cat(jacobians), torch.cat(outputs)
        finite = torch.isfinite(torch.as_tensor(loss)).all()
        if not (finite and torch.isfinite(J).all() and torch.isfinite(f).all()):
            raise ValueError(
                "The training loss or the Jacobians contain NaN or Inf; check the "
                "data for NaN/Inf and the model for divergence."
            )
        self._commit(
            {
                "n_outputs": int(f.shape[-1]),
                "_subset_inputs": concatenate_rows(inputs),
                "loss": loss,
                "n_data": len(f),
                "mean": self._parameter_vector(),
                **self._factorization(J, f),
            }
        )

    def _get_SoD_data_loader(self, train_loader: Iterable) -> DataLoader:
        """The subset of data: a loader over the rows
        ``numpy.random.default_rng(seed).choice(N, n_subset, replace=False)`` of
        ``train_loader.dataset`` (``N`` rows), in that order, not shuffled, with
        the batch size (and collate function) of ``train_loader``."""
        indices = sod_indices(dataset_size(train_loader), self.n_subset, self.seed)
        return subset_loader(train_loader, indices)

    def _factorization(self, J: torch.Tensor, f: torch.Tensor) -> dict[str, Any]:
        """The subset's Jacobians ``J`` ``(M, O, P)``, the factors ``L``
        ``(M, O, O)`` of its output Hessians (``None`` for regression) and the
        eigendecomposition of ``A = L^T K_MM L`` (per output, with the diagonal
        of the output Hessians, for ``independent_outputs``), as attributes to
        assign."""
        L = self._lambda_sqrt(f)
        K = self._kernel_batch(J, J)
        M, n_out = f.shape
        if self.independent_outputs:
            # (M, O): square roots of the diagonal of Lambda
            scale = torch.ones_like(f) if L is None else L.square().sum(-1).sqrt()
            A = (scale.T[:, :, None] * K.permute(2, 0, 1)) * scale.T[:, None, :]
            L = scale
        elif L is not None:
            K = K.reshape(M, n_out, M, n_out)
            A = torch.einsum("moc,mond,nde->mcne", L, K, L).reshape(M * n_out, -1)
        else:
            A = K
        eigvals, eigvecs = symeig(0.5 * (A + A.mT))
        return {
            "_J_subset": J,
            "_L_subset": L,
            "_eigvals": eigvals,
            "_eigvecs": eigvecs,
        }

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

    # ---- predictive ----------------------------------------------------------------------
    def _weights(self) -> torch.Tensor:
        """``1 / (delta / c + a)``, ``(M * O,)`` or ``(O, M)``."""
        return 1.0 / (self._delta / self._H_factor + self._eigvals)

    def _cross_factor(self, Js: torch.Tensor) -> torch.Tensor:
        """``K_*M L`` for test Jacobians ``(b, O, P)``: ``(b, O, M * O)``, or
        ``(b, O, M)`` with ``independent_outputs``."""
        K = self._kernel_batch_star(Js, self._J_subset)
        L = self._L_subset
        if self.independent_outputs:  # K (b, M, O), L (M, O)
            return (K * L).transpose(1, 2)
        if L is None:  # (b, M, O, O) -> (b, O, M * O)
            return K.permute(0, 2, 1, 3).reshape(len(Js), Js.shape[1], -1)
        return torch.einsum("bmoe,mec->bomc", K, L).reshape(len(Js), Js.shape[1], -1)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        C = self._cross_factor(Js)
        if self.independent_outputs:
            U = torch.einsum("bom,oml->bol", C, self._eigvecs)
            var = self._kernel_star(Js) - (U.square() * self._weights()).sum(-1)
            return torch.diag_embed(var / self._delta)
        U = C @ self._eigvecs  # (batch, O, M * O)
        cov = self._kernel_star(Js) - (U * self._weights()) @ U.mT
        return cov / self._delta

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        b, n_out = Js.shape[:2]
        C = self._cross_factor(Js)
        K = self._kernel_star(Js, joint=True)
        if not self.independent_outputs:
            K = K.transpose(1, 2).reshape(b * n_out, b * n_out)
            U = C.reshape(b * n_out, -1) @ self._eigvecs
            return (K - (U * self._weights()) @ U.mT) / self._delta
        U = C.transpose(0, 1) @ self._eigvecs  # (O, batch, M)
        per_output = K.permute(2, 0, 1) - (U * self._weights().unsqueeze(1)) @ U.mT
        eye = torch.eye(n_out, device=Js.device, dtype=Js.dtype)
        cov = torch.einsum("obc,op->bocp", per_output, eye)
        return cov.reshape(b * n_out, b * n_out) / self._delta

    # ---- checkpoints --------------------------------------------------------------------

    def _own_state(self) -> dict[str, Any]:
        X = self._subset_inputs
        return {"subset_inputs": X if isinstance(X, torch.Tensor) else dict(X)}

    def _check_own_state(self, state_dict: dict[str, Any]) -> None:
        X = state_dict["subset_inputs"]
        inputs_entry(X, "subset_inputs")
        n = batch_size(X, self.dict_key_x)
        if n != self.n_subset:
            raise ValueError(
                f"State dict entry 'subset_inputs' holds {n} inputs; n_subset is "
                f"{self.n_subset}."
            )

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        X = to_device(detached_copy(state_dict["subset_inputs"]), self._device)
        n = batch_size(X, self.dict_key_x)
        # the model runs here for the first time: check its outputs first
        self._check_model_outputs(select_rows(X, slice(0, _CHUNK), n))
        jacobians, outputs = [], []
        with eval_mode(self.model), model_inputs_entry("subset_inputs"):
            for start in range(0, n, _CHUNK):
                rows = select_rows(X, slice(start, start + _CHUNK), n)
                Js, f = self._jacobians(rows, enable_backprop=False)
                jacobians.append(Js)
                outputs.append(f)
        J, f = torch.cat(jacobians), torch.cat(outputs)
        self._commit({"_subset_inputs": X, **self._factorization(J, f)})
