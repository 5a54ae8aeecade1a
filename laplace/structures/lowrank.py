"""Low-rank plus diagonal posterior precision: the curvature replaced by its
top-k eigenpairs.

``P = U diag(c lambda) U^T + diag(p0)`` with ``U`` `(P, k)` the leading
eigenvectors of the data set's curvature. With ``B = U diag(sqrt(c lambda))`` and
``D = diag(1 / p0)`` every quantity goes through the `(k, k)` matrix
``K = I + B^T D B``:

* covariance (Woodbury): ``Sigma = D - V K^{-1} V^T`` with ``V = D B``,
* log-determinant (determinant lemma): ``log det P = sum log p0 + log det K``.

The eigenpairs are found matrix-free by Lanczos (ARPACK's ``eigsh``) on
curvature-vector products of a curvlinops backend; when ``k`` is at least half
the number of parameters the dense curvature is cheaper and is decomposed
exactly. Negative eigenvalues (round-off, or a Hessian backend) become 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from laplace.checkpoint import tensor_entry
from laplace.structures.protocol import Layout, PosteriorStructure, Precision
from laplace.utils.linalg import symeig
from laplace.utils.memo import Memo
from laplace.utils.utils import expand_to_parameters

__all__ = ["LowRankStructure", "LowRankPrecision", "DEFAULT_RANK"]

DEFAULT_RANK = 10
# Identity columns per dense operator product (bounds curvlinops' memory).
MATMAT_CHUNK = 256

Eigenpairs = tuple[Tensor, Tensor]


class LowRankPrecision(Precision):
    """``P = U diag(c lambda) U^T + diag(p0)`` (see the module docstring)."""

    def __init__(self, H: Eigenpairs, factor: Tensor, prior_diag: Tensor) -> None:
        super().__init__()
        self.U, self.eigenvalues = H[0], factor * H[1]
        self.prior_diag = prior_diag

    @property
    def public(self) -> tuple[Eigenpairs, Tensor]:
        """``((U, c * lambda), prior)``: eigenvectors `(P, k)`, eigenvalues scaled
        by ``c`` `(k,)` and the prior `(P,)`."""
        return (self.U, self.eigenvalues), self.prior_diag

    def woodbury(self) -> tuple[Tensor, Tensor, Tensor]:
        """Prior variances ``d`` `(P,)`, ``V = D B`` `(P, k)` and the Cholesky
        factor `(k, k)` of ``K = I + B^T D B``."""

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            d = self.prior_diag.reciprocal()
            B = self.U * self.eigenvalues.sqrt()
            V = d.unsqueeze(-1) * B
            K = B.T @ V
            K = K + torch.eye(len(K), device=K.device, dtype=K.dtype)
            return d, V, torch.linalg.cholesky(K)

        return self._cached("woodbury", compute)

    def logdet(self) -> Tensor:
        L = self.woodbury()[2]
        return self.prior_diag.log().sum() + 2 * L.diagonal().log().sum()

    def _projected(self, W: Tensor) -> Tensor:
        """``Z = L^{-1} (W V)^T``: ``(W V) K^{-1} (W V)^T = Z^T Z``."""
        _, V, L = self.woodbury()
        return torch.linalg.solve_triangular(L, (W @ V).transpose(-1, -2), upper=False)

    def square_form(self, W: Tensor) -> Tensor:
        d = self.woodbury()[0]
        Z = self._projected(W)
        return (W * d) @ W.transpose(-1, -2) - Z.transpose(-1, -2) @ Z

    def square_form_diagonal(self, W: Tensor) -> Tensor:
        d = self.woodbury()[0]
        return (W.square() * d).sum(-1) - self._projected(W).square().sum(-2)

    def quadratic(self, delta: Tensor) -> Tensor:
        proj = delta @ self.U
        return delta @ (self.prior_diag * delta) + (
            proj.square() * self.eigenvalues
        ).sum(-1)

    def sample_deviations(self, eps: Tensor) -> Tensor:
        # Sigma = D^{1/2} (I + A A^T)^{-1} D^{1/2} with A = D^{1/2} B; with the thin
        # SVD A = Q S R^T its symmetric root is I + Q ((1 + S^2)^{-1/2} - 1) Q^T.
        d, V, _ = self.woodbury()
        sqrt_d = d.sqrt()
        Q, S, _ = torch.linalg.svd(V / sqrt_d.unsqueeze(-1), full_matrices=False)
        shrink = (1 + S.square()).rsqrt() - 1
        return sqrt_d * (eps + ((eps @ Q) * shrink) @ Q.T)

    def covariance(self) -> Tensor:
        d, V, L = self.woodbury()
        Z = torch.linalg.solve_triangular(L, V.T, upper=False)
        return torch.diag(d) - Z.T @ Z


class LowRankStructure(PosteriorStructure):
    """``hessian_structure='lowrank'``: the top ``low_rank`` eigenpairs of the
    curvature (``backend_kwargs['low_rank']``, default 10, capped at the number
    of parameters), from curvature-vector products of a curvlinops backend."""

    name = "lowrank"
    continuation_error = (
        "LowRankLaplace does not support fit(..., override=False): top-k "
        "eigenpairs of old and new curvature cannot be combined; refit on all "
        "data with override=True."
    )

    def __init__(self, options: dict[str, Any]) -> None:
        _check_backend(options["backend"])
        rank = (options["backend_kwargs"] or {}).get("low_rank", DEFAULT_RANK)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(
                f"backend_kwargs['low_rank'] must be a positive int; got {rank!r}."
            )
        self.rank = rank

    def backend_options(self, backend_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in backend_kwargs.items() if k != "low_rank"}

    def _k(self, layout: Layout) -> int:
        return min(self.rank, layout.n_params)

    def zero(self, layout: Layout, device: Any, dtype: Any) -> Eigenpairs:
        # any orthonormal basis with zero eigenvalues: the posterior is the prior
        k = self._k(layout)
        U = torch.eye(layout.n_params, k, device=device, dtype=dtype)
        return U, torch.zeros(k, device=device, dtype=dtype)

    def accumulator(self, layout: Layout, device: Any, dtype: Any) -> list:
        # (operator, scale) per batch; finish decomposes their sum
        return []

    def batch(
        self, backend: Any, X: Any, y: Tensor, N: int, dtype: torch.dtype
    ) -> tuple[Tensor, list]:
        loss, op, scale = backend.curvature_operator(X, y)
        return loss, [(op, scale)]

    def is_finite(self, H: Any) -> bool:
        # checked on the eigenpairs in finish
        return True

    def finish(
        self, total: list, layout: Layout, device: Any, dtype: Any
    ) -> Eigenpairs:
        U, eigenvalues = top_eigenpairs(total, layout, self._k(layout), device, dtype)
        if not (torch.isfinite(U).all() and torch.isfinite(eigenvalues).all()):
            raise ValueError(
                "The curvature eigenpairs contain NaN or Inf; check the data for "
                "NaN/Inf and the model for divergence."
            )
        return U, eigenvalues

    def precision(
        self,
        H: Eigenpairs,
        factor: Tensor,
        prior_precision: Tensor,
        layout: Layout,
        memo: Memo,
    ) -> LowRankPrecision:
        prior = expand_to_parameters(prior_precision, layout.groups)
        return LowRankPrecision(H, factor, prior)

    def saved(self, H: Eigenpairs) -> dict[str, Tensor]:
        return {"eigenvectors": H[0], "eigenvalues": H[1]}

    def loaded(self, value: Any, layout: Layout, like: Tensor) -> Eigenpairs:
        keys = {"eigenvectors", "eigenvalues"}
        if not isinstance(value, Mapping) or set(value) != keys:
            got = sorted(value) if isinstance(value, Mapping) else type(value)
            raise ValueError(
                "State dict entry 'H' of LowRankLaplace must be a dict with keys "
                f"{sorted(keys)}; got {got}."
            )
        P, k = layout.n_params, self._k(layout)
        U = tensor_entry(value["eigenvectors"], "H['eigenvectors']", (P, k), like=like)
        eigenvalues = tensor_entry(
            value["eigenvalues"], "H['eigenvalues']", (k,), like=like, nonnegative=True
        )
        return U, eigenvalues


def _check_backend(backend: type | None) -> None:
    from laplace.curvature.curvlinops import CurvlinopsInterface

    if backend is not None and not (
        isinstance(backend, type) and issubclass(backend, CurvlinopsInterface)
    ):
        raise ValueError(
            "LowRankLaplace needs curvature-vector products from a curvlinops "
            "backend (CurvlinopsGGN, CurvlinopsEF or CurvlinopsHessian); got "
            f"backend={backend!r}."
        )


def top_eigenpairs(
    ops: list, layout: Layout, k: int, device: Any, dtype: Any
) -> Eigenpairs:
    """Eigenvectors `(P, k)` and eigenvalues `(k,)`, descending, of the sum of the
    per-batch curvature operators ``[(op, scale), ...]``."""
    ref = layout.params[0]

    def matmat(V: Tensor) -> Tensor:
        V = V.to(ref.device, ref.dtype)
        return sum(scale * (op @ V) for op, scale in ops).detach()

    n = layout.n_params
    if 2 * k >= n:
        evals, evecs = dense_eigh(matmat, n, ref)
    else:
        evals, evecs = lanczos(matmat, n, k, ref)
    order = evals.argsort(descending=True)[:k]
    return (
        evecs[:, order].to(device, dtype),
        evals[order].clamp_min(0).to(device, dtype),
    )


def dense_eigh(
    matmat: Callable[[Tensor], Tensor], n: int, ref: Tensor
) -> tuple[Tensor, Tensor]:
    """All eigenpairs of the `(n, n)` operator, formed densely."""
    eye = torch.eye(n, device=ref.device, dtype=ref.dtype)
    H = torch.cat([matmat(cols) for cols in eye.split(MATMAT_CHUNK, dim=1)], dim=1)
    return symeig(0.5 * (H + H.T))


def lanczos(
    matmat: Callable[[Tensor], Tensor], n: int, k: int, ref: Tensor
) -> tuple[Tensor, Tensor]:
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
