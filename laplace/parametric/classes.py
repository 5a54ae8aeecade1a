"""The public weight-space classes. Each fixes a parameter selector, a posterior
structure and laplace-torch 0.3's signature; everything else is
:class:`~laplace.parametric.weight_space.ParametricLaplace`. The class tree is
laplace-torch's (``FullLLLaplace`` is an ``LLLaplace`` and a ``FullLaplace``);
the structure-specific properties are thin views of the posterior precision."""

from __future__ import annotations

from typing import Any

import torch

from laplace.parametric.weight_space import ParametricLaplace
from laplace.selectors import LastLayer, Subnetwork
from laplace.signatures import (
    KRON,
    KRON_LAST_LAYER,
    LAST_LAYER,
    LOW_RANK,
    SUBNETWORK,
    constructor,
)
from laplace.structures import (
    DenseStructure,
    DiagonalStructure,
    KroneckerStructure,
    LowRankStructure,
)
from laplace.utils.eval_mode import eval_mode
from laplace.utils.matrix import Kron

__all__ = [
    "FullLaplace",
    "KronLaplace",
    "DiagLaplace",
    "LowRankLaplace",
    "LLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "DiagLLLaplace",
    "SubnetLaplace",
    "FullSubnetLaplace",
    "DiagSubnetLaplace",
]


# ---- structures ----------------------------------------------------------------------
class FullLaplace(ParametricLaplace):
    """Laplace approximation with a dense posterior precision
    ``P = H / (sigma^2 T) + diag(prior_precision)``.

    The curvature ``H`` is eigendecomposed once after ``fit``; with a scalar prior
    the log-determinant (and so marginal-likelihood tuning) then costs ``O(P)``.
    """

    _structure_type = DenseStructure

    @property
    def H_eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the curvature ``H`` (computed once per ``H``)."""
        return DenseStructure.eigenvalues(self._H, self._memo)

    @property
    def posterior_scale(self) -> torch.Tensor:
        """``S`` with ``S S^T = P^{-1}`` (inverse transposed Cholesky factor of
        ``P``), ``(n_params, n_params)``."""
        return self._to_output(self._precision().scale())

    @property
    def posterior_covariance(self) -> torch.Tensor:
        """``P^{-1}``, ``(n_params, n_params)``."""
        return self._to_output(self._precision().covariance())


class KronLaplace(ParametricLaplace):
    """Laplace approximation with a block-diagonal Kronecker-factored posterior
    precision: per parameter tensor ``G kron A / (sigma^2 T) + delta I`` (KFAC).

    After ``fit``, ``H_facs`` holds the accumulated :class:`Kron` factors and ``H``
    their eigendecomposition (:class:`KronDecomposed`), so that changing the prior
    precision (scalar or one per layer) costs no new decomposition.

    Parameters
    ----------
    damping : bool, default=False
        Add the prior precision to each Kronecker factor (``sqrt(delta)`` each)
        instead of to their product.
    """

    _structure_type = KroneckerStructure
    __init__ = constructor(KRON)

    @property
    def damping(self) -> bool:
        """Whether the prior is added to each Kronecker factor."""
        return self._structure.damping

    @damping.setter
    def damping(self, value: bool) -> None:
        self._structure = KroneckerStructure({"damping": value})

    @property
    def H_facs(self) -> Kron | None:
        """The summed Kronecker factors (``None`` before ``fit``)."""
        return self._to_output(self._H) if self.is_fitted else None

    @property
    def H(self) -> Any:
        # before fit the zero factors, after it their eigendecomposition
        if not self.is_fitted:
            if self._H is None and self.params:
                self._init_H()
            return self._to_output(self._H)
        return super().H

    @H.setter
    def H(self, value: Any) -> None:
        self._H = value


class DiagLaplace(ParametricLaplace):
    """Laplace approximation with a diagonal posterior precision
    ``P = diag(H) / (sigma^2 T) + prior_precision``."""

    _structure_type = DiagonalStructure

    @property
    def posterior_scale(self) -> torch.Tensor:
        """Posterior standard deviations, ``(n_params,)``."""
        return self._to_output(self._precision().scale())

    @property
    def posterior_variance(self) -> torch.Tensor:
        """Posterior variances, ``(n_params,)``."""
        return self._to_output(self._precision().variance())


class LowRankLaplace(ParametricLaplace):
    """Laplace approximation with a low-rank plus diagonal posterior precision
    ``P = U diag(lambda) U^T / (sigma^2 T) + diag(prior_precision)``, ``U`` the
    top-k eigenvectors of the curvature (see :mod:`laplace.structures.lowrank`).

    Parameters
    ----------
    backend : CurvlinopsInterface subclass, optional
        ``CurvlinopsGGN`` (default), ``CurvlinopsEF`` or ``CurvlinopsHessian``.
    backend_kwargs : dict, optional
        ``low_rank`` (int, default 10, capped at the number of parameters) sets
        the rank; the other entries go to the backend.

    Other parameters as in :class:`~laplace.BaseLaplace`. The batches of the
    training data are kept in memory until the eigendecomposition at the end of
    :meth:`fit` is done; ``fit(..., override=False)`` is not supported.
    """

    _structure_type = LowRankStructure
    __init__ = constructor(LOW_RANK)

    @property
    def low_rank(self) -> int:
        return self._structure.rank

    @property
    def V(self) -> torch.Tensor:
        """``D U diag(sqrt(c lambda))``, `(n_params, k)`: ``Sigma = D - V Kinv V^T``."""
        return self._precision().woodbury()[1]

    @property
    def Kinv(self) -> torch.Tensor:
        """``(I_k + V^T diag(p0) V)^{-1}`` (= ``(I_k + B^T D B)^{-1}``), `(k, k)`:
        the inner inverse of the Woodbury identity."""
        return torch.cholesky_inverse(self._precision().woodbury()[2])


# ---- last layer ----------------------------------------------------------------------
class LLLaplace(ParametricLaplace):
    """Base class of last-layer Laplace approximations.

    The model is wrapped in a :class:`FeatureExtractor` around a deep copy, so the
    user's model is never touched. The last layer is ``last_layer_name`` or, when
    ``None``, found automatically on the first batch of ``fit``.

    Parameters
    ----------
    feature_reduction : FeatureReduction or str, optional
        Reduce features ``(batch, *middle, dim)`` (e.g. ``(batch, seq, dim)``) to
        ``(batch, dim)``: 'pick_first' / 'pick_last' (index 0 / -1 of every
        middle dim) or 'average' (mean over them); see :class:`FeatureExtractor`.
    last_layer_name : str, optional
    """

    _selector_type = LastLayer
    __init__ = constructor(LAST_LAYER)

    @property
    def _last_layer_name(self) -> str | None:
        """The ``last_layer_name`` given (``None``: found), as laplace-torch saves."""
        return self._selector.given_name

    def functional_variance_fast(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive mean ``f_mu`` ``(batch, n_outputs)`` (the network output)
        and the diagonal of its variance ``f_var`` ``(batch, n_outputs)``, in
        closed form from the features (no Jacobians) for full, Kron and diagonal
        posteriors; ``__call__`` uses the same route."""
        self._check_fitted()
        X = self._to_device(X)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            moments = self._glm_predictive_distribution(X, diagonal_output=True)
        return self._to_output(moments)


class FullLLLaplace(LLLaplace, FullLaplace):
    """Last-layer Laplace with a dense posterior precision."""


class KronLLLaplace(LLLaplace, KronLaplace):
    """Last-layer Laplace with a Kronecker-factored posterior precision.

    Parameters as :class:`LLLaplace`, plus ``damping`` (after
    ``last_layer_name``), as in :class:`~laplace.KronLaplace`.
    """

    __init__ = constructor(KRON_LAST_LAYER)


class DiagLLLaplace(LLLaplace, DiagLaplace):
    """Last-layer Laplace with a diagonal posterior precision."""


# ---- subnetwork ----------------------------------------------------------------------
class SubnetLaplace(ParametricLaplace):
    """Base class of subnetwork Laplace approximations.

    The posterior is a Gaussian over the entries ``subnetwork_indices`` of the
    flattened vector of trainable parameters (``requires_grad=True``, in
    ``parameters()`` order); all other parameters stay at their MAP values.
    ``n_params`` (= ``n_params_subnet``) is the subnetwork size ``K``, ``mean``
    the full MAP vector and ``mean_subnet`` its subnetwork entries.  The prior
    precision and mean are scalars or one value per subnetwork parameter.

    Parameters
    ----------
    subnetwork_indices : LongTensor
        `(K,)` distinct indices, e.g. from a :mod:`laplace.utils.subnetmask` mask.
    backend : type, optional
        A GGN or EF backend (``CurvlinopsGGN`` by default, ``CurvlinopsEF``, ...).
    asdl_fisher_kwargs : None
        Not supported; must be ``None``.

    Other parameters as in :class:`~laplace.BaseLaplace`.
    """

    _selector_type = Subnetwork
    __init__ = constructor(SUBNETWORK)

    @property
    def subnetwork_indices(self) -> torch.LongTensor:
        return self._selector.indices

    @property
    def n_params_subnet(self) -> int:
        return len(self._selector.indices)

    @property
    def mean_subnet(self) -> torch.Tensor:
        """MAP values of the subnetwork parameters, ``(n_params_subnet,)``."""
        return self._posterior_mean

    def assemble_full_samples(self, subnet_samples: torch.Tensor) -> torch.Tensor:
        """Full parameter vectors from subnetwork samples: ``(n_samples, K)`` ->
        ``(n_samples, n_params_all)``, the other entries at the MAP."""
        return self._selector.full_vectors(subnet_samples, self.mean)


class FullSubnetLaplace(SubnetLaplace, FullLaplace):
    """Subnetwork Laplace with a dense `(K, K)` posterior precision."""


class DiagSubnetLaplace(SubnetLaplace, DiagLaplace):
    """Subnetwork Laplace with a diagonal `(K,)` posterior precision."""
