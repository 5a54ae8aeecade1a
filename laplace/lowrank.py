"""Low-rank Laplace: the curvature replaced by its top-k eigenpairs.

``P = U diag(c lambda) U^T + diag(p0)`` with ``U`` `(P, k)` the leading
eigenvectors of the data set's curvature (GGN by default), ``c = _H_factor``
and ``p0`` the prior precision.  With ``B = U diag(sqrt(c lambda))`` and
``D = diag(1 / p0)`` every quantity goes through the `(k, k)` matrix
``K = I + B^T D B``:

* covariance (Woodbury): ``Sigma = D - V K^{-1} V^T`` with ``V = D B``,
* log-determinant (determinant lemma): ``log det P = sum log p0 + log det K``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from laplace.base import eval_mode
from laplace.checkpoint import tensor_entry
from laplace.curvature.curvlinops import CurvlinopsInterface
from laplace.parametric.base import ParametricLaplace
from laplace.signatures import LOW_RANK, constructor
from laplace.utils.linalg import symeig

__all__ = ["LowRankLaplace"]

_DEFAULT_RANK = 10
# Identity columns per dense operator product (bounds curvlinops' memory).
_MATMAT_CHUNK = 256


class LowRankLaplace(ParametricLaplace):
    """Laplace approximation with a low-rank plus diagonal posterior precision.

    The top-k eigenpairs of the curvature summed over the training data are
    found matrix-free by Lanczos (ARPACK's ``eigsh``) on curvature-vector
    products of a curvlinops backend; when ``k`` is at least half the number of
    parameters the dense curvature is cheaper and is decomposed exactly.
    Negative eigenvalues (round-off, or a Hessian backend) are clamped to 0.

    Parameters
    ----------
    backend : CurvlinopsInterface subclass, optional
        ``CurvlinopsGGN`` (default), ``CurvlinopsEF`` or ``CurvlinopsHessian``.
    backend_kwargs : dict, optional
        ``low_rank`` (int, default 10, capped at the number of parameters) sets
        the rank; the other entries go to the backend.

    Other parameters as in :class:`~laplace.BaseLaplace`.  The batches of the
    training data are kept in memory until the eigendecomposition at the end of
    :meth:`fit` is done.
    """

    _key = ("all", "lowrank")

    __init__ = constructor(LOW_RANK)

    def _setup(self, options: dict[str, Any]) -> None:
        backend = options["backend"]
        if backend is not None and not (
            isinstance(backend, type) and issubclass(backend, CurvlinopsInterface)
        ):
            raise ValueError(
                "LowRankLaplace needs curvature-vector products from a curvlinops "
                "backend (CurvlinopsGGN, CurvlinopsEF or CurvlinopsHessian); got "
                f"backend={backend!r}."
            )
        rank = (options["backend_kwargs"] or {}).get("low_rank", _DEFAULT_RANK)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"backend_kwargs['low_rank'] must be a positive int; got {rank!r}."
            )
        self.low_rank = rank
        super()._setup(options)

    def _backend_init_kwargs(self) -> dict[str, Any]:
        kwargs = super()._backend_init_kwargs()
        kwargs.pop("low_rank", None)
        return kwargs

    # ---- fit: collect per-batch operators, decompose their sum at the end ----------
    def fit(
        self, train_loader: Iterable, override: bool = True, progress_bar: bool = False
    ) -> None:
        """Fit on ``train_loader``; see :meth:`ParametricLaplace.fit`.

        ``override=False`` is not supported: the top-k eigenpairs of two data sets
        do not give those of their union.
        """
        if not override:
            raise ValueError(
                "LowRankLaplace does not support fit(..., override=False): top-k "
                "eigenpairs of old and new curvature cannot be combined; refit on all "
                "data with override=True."
            )
        super().fit(train_loader, override=True, progress_bar=progress_bar)

    def _zero_H(self) -> tuple[torch.Tensor, torch.Tensor]:
        # any orthonormal basis with zero eigenvalues: the posterior is the prior
        k = min(self.low_rank, self.n_params)
        U = torch.eye(self.n_params, k, device=self._device, dtype=self._dtype)
        return U, torch.zeros(k, device=self._device, dtype=self._dtype)

    def _zero_accumulator(self) -> list:
        # (operator, scale) per batch; _posterior_state decomposes their sum
        return []

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        loss, op, scale = self.backend.curvature_operator(X, y)
        return loss, [(op, scale)]

    def _curvature_is_finite(self, H: Any) -> bool:
        # checked on the eigenpairs in _posterior_state
        return True

    def _posterior_state(self, H: Any) -> dict[str, Any]:
        if isinstance(H, list):
            with eval_mode(self.model), torch.enable_grad():
                H = self._top_eigenpairs(H)
        U, eigenvalues = H
        if not (torch.isfinite(U).all() and torch.isfinite(eigenvalues).all()):
            raise ValueError(
                "The curvature eigenpairs contain NaN or Inf; check the data for "
                "NaN/Inf and the model for divergence."
            )
        return {"H": (U, eigenvalues)}

    def _top_eigenpairs(self, ops: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvectors `(P, k)` and eigenvalues `(k,)`, descending, of the summed
        per-batch curvature."""
        ref = self.params[0]

        def matmat(V: torch.Tensor) -> torch.Tensor:
            V = V.to(ref.device, ref.dtype)
            return sum(scale * (op @ V) for op, scale in ops).detach()

        n, k = self.n_params, min(self.low_rank, self.n_params)
        if 2 * k >= n:
            evals, evecs = _dense_eigh(matmat, n, ref)
        else:
            evals, evecs = _lanczos(matmat, n, k, ref)
        order = evals.argsort(descending=True)[:k]
        return (
            evecs[:, order].to(self._device, self._dtype),
            evals[order].clamp_min(0).to(self._device, self._dtype),
        )

    # ---- Woodbury pieces ---------------------------------------------------------------
    def _hyperparameters_changed(self) -> None:
        self._woodbury_cache = None

    def _woodbury(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior variances ``d`` `(P,)`, ``V = D B`` `(P, k)` and the Cholesky
        factor `(k, k)` of ``K = I + B^T D B``."""
        self._check_fitted()
        needs_graph = torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.prior_precision, self.sigma_noise)
        )
        if self._woodbury_cache is not None and not needs_graph:
            return self._woodbury_cache
        U, eigenvalues = self._H
        d = self.prior_precision_diag.reciprocal()
        B = U * (self._H_factor * eigenvalues).sqrt()
        V = d.unsqueeze(-1) * B
        K = B.T @ V
        K.diagonal().add_(1.0)
        pieces = (d, V, torch.linalg.cholesky(K))
        if not needs_graph:
            self._woodbury_cache = tuple(t.detach() for t in pieces)
        return pieces

    @property
    def V(self) -> torch.Tensor:
        """``D U diag(sqrt(c lambda))``, `(n_params, k)`: ``Sigma = D - V Kinv V^T``."""
        return self._woodbury()[1]

    @property
    def Kinv(self) -> torch.Tensor:
        """``(I_k + V^T diag(p0) V)^{-1}`` (= ``(I_k + B^T D B)^{-1}``), `(k, k)`:
        the inner inverse of the Woodbury identity."""
        return torch.cholesky_inverse(self._woodbury()[2])

    @property
    def _posterior_precision(
        self,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``((U, c * lambda), prior_precision_diag)``: eigenvectors `(P, k)`,
        eigenvalues scaled by ``_H_factor`` `(k,)` and the prior `(P,)`, so that
        ``P = U diag(c lambda) U^T + diag(prior_precision_diag)``."""
        self._check_fitted()
        U, eigenvalues = self._H
        return (U, self._H_factor * eigenvalues), self.prior_precision_diag

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        L = self._woodbury()[2]
        return self.log_det_prior_precision + 2 * L.diagonal().log().sum()

    def _cov_square_form(self, W: torch.Tensor) -> torch.Tensor:
        d, V, L = self._woodbury()
        prior_part = (W * d) @ W.transpose(-1, -2)
        # (W V) K^{-1} (W V)^T = Z^T Z with Z = L^{-1} (W V)^T
        Z = torch.linalg.solve_triangular(L, (W @ V).transpose(-1, -2), upper=False)
        return prior_part - Z.transpose(-1, -2) @ Z

    def _functional_variance_diag(self, Js: torch.Tensor) -> torch.Tensor:
        d, V, L = self._woodbury()
        Z = torch.linalg.solve_triangular(L, (Js @ V).transpose(-1, -2), upper=False)
        return (Js.square() * d).sum(-1) - Z.square().sum(-2)

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        U, eigenvalues = self._H
        proj = delta @ U
        return delta @ (self.prior_precision_diag * delta) + self._H_factor * (
            proj.square() * eigenvalues
        ).sum(-1)

    def _sample_deviations(self, eps: torch.Tensor) -> torch.Tensor:
        # Sigma = D^{1/2} (I + A A^T)^{-1} D^{1/2} with A = D^{1/2} B; with the thin
        # SVD A = Q S R^T its symmetric root is I + Q ((1 + S^2)^{-1/2} - 1) Q^T.
        d, V, _ = self._woodbury()
        sqrt_d = d.sqrt()
        Q, S, _ = torch.linalg.svd(V / sqrt_d.unsqueeze(-1), full_matrices=False)
        shrink = (1 + S.square()).rsqrt() - 1
        return sqrt_d * (eps + ((eps @ Q) * shrink) @ Q.T)

    # ---- serialization ---------------------------------------------------------------
    def _H_state(self) -> Any:
        U, eigenvalues = self._H
        return {"eigenvectors": U, "eigenvalues": eigenvalues}

    def _validated_H(self, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys = {"eigenvectors", "eigenvalues"}
        if not isinstance(value, Mapping) or set(value) != keys:
            got = sorted(value) if isinstance(value, Mapping) else type(value)
            raise ValueError(
                "State dict entry 'H' of LowRankLaplace must be a dict with keys "
                f"{sorted(keys)}; got {got}."
            )
        P, k = self.n_params, min(self.low_rank, self.n_params)
        like = self.prior_precision
        U = tensor_entry(value["eigenvectors"], "H['eigenvectors']", (P, k), like=like)
        eigenvalues = tensor_entry(
            value["eigenvalues"], "H['eigenvalues']", (k,), like=like, nonnegative=True
        )
        return U, eigenvalues


def _dense_eigh(
    matmat: Callable[[torch.Tensor], torch.Tensor], n: int, ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenpairs of the `(n, n)` operator, formed densely."""
    eye = torch.eye(n, device=ref.device, dtype=ref.dtype)
    H = torch.cat([matmat(cols) for cols in eye.split(_MATMAT_CHUNK, dim=1)], dim=1)
    return symeig(0.5 * (H + H.T))


def _lanczos(
    matmat: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, ref: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenpairs by implicitly restarted Lanczos (ARPACK)."""

    def apply(v: np.ndarray) -> np.ndarray:
        V = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(n, -1))
        out = matmat(V).to("cpu", torch.float64).numpy()
        return out.reshape(v.shape)

    op = LinearOperator((n, n), matvec=apply, matmat=apply, dtype=np.float64)
    # fixed start vector: reproducible fits
    v0 = np.random.default_rng(0).standard_normal(n)
    # products in lower precision cannot reach float64 residuals
    tol = 0.0 if ref.dtype == torch.float64 else torch.finfo(ref.dtype).eps ** 0.5
    evals, evecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol)
    return torch.from_numpy(evals), torch.from_numpy(evecs)
