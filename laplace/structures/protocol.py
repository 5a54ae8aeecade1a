"""What a posterior structure provides.

A structure is one shape of the curvature ``H`` and of the posterior precision
``P = c H + prior`` (``c = 1 / (sigma^2 T)``): dense, diagonal, Kronecker-factored
or low-rank plus diagonal. It comes in two parts:

- :class:`PosteriorStructure`, the strategy a Laplace class holds: the zero
  curvature, one batch's curvature from the backend, sums, checks, the saved
  form of ``H`` (laplace-torch 0.3's ``state_dict['H']``) and the spectrum the
  closed-form prior tuning uses;
- :class:`Precision`, an immutable value ``P`` built from ``H``, ``c`` and the
  prior: ``logdet``, the square form ``W Sigma W^T``, the sample root and what
  the fast GLM predictive needs. Derived quantities (Cholesky factors,
  Woodbury pieces) are computed once per value, through :class:`Memo`.

Curvature values are plain: a ``(P, P)`` or ``(P,)`` tensor, a
:class:`~laplace.utils.matrix.Kron`, eigenpairs ``(U, lambda)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from laplace.utils.memo import Memo

__all__ = [
    "Layout",
    "Precision",
    "PosteriorStructure",
    "Spectrum",
    "not_positive_definite",
]

#: eigenvalues ``(n,)`` of ``H`` with ``log det P = sum_i log(c e_i + delta_i)``
#: and the finest prior length for which that holds (1: scalar; ``n_layers``:
#: eigenvalues in parameter-tensor order; ``n``: one per parameter)
Spectrum = tuple[Tensor, int]


@dataclass(frozen=True)
class Layout:
    """The parameters a posterior is over (given by the parameter selector).

    Attributes
    ----------
    params : tuple of Tensor
        The treated parameter tensors (all of them for a subnetwork).
    n_params : int
        Dimension of the Gaussian (``K`` for a subnetwork).
    groups : tuple of int
        Sizes of the prior groups: one per parameter tensor, or ``(K,)``.
    """

    params: tuple[Tensor, ...]
    n_params: int
    groups: tuple[int, ...]


def not_positive_definite() -> ValueError:
    return ValueError(
        "The posterior precision is not positive definite; increase the prior "
        "precision or use a GGN/EF backend (the Hessian can be indefinite away "
        "from a minimum)."
    )


class Precision:
    """``P = c H + prior`` of one structure over ``n_params`` parameters."""

    #: whether the GLM predictive may square Jacobians assembled from layer
    #: factors (structures without :meth:`layer_blocks`)
    assembled_jacobians: ClassVar[bool] = False

    def __init__(self) -> None:
        self._memo = Memo()

    def _cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per value (the value is immutable)."""
        return self._memo.get(name, (), compute)

    @property
    def public(self) -> Any:
        """What ``posterior_precision`` shows (structure-specific)."""
        raise NotImplementedError

    def logdet(self) -> Tensor:
        """``log det P``, ``()``."""
        raise NotImplementedError

    def square_form(self, W: Tensor) -> Tensor:
        """``W Sigma W^T`` for ``W`` ``(batch, k, P)``: ``(batch, k, k)``."""
        raise NotImplementedError

    def square_form_diagonal(self, W: Tensor) -> Tensor:
        """Diagonal of :meth:`square_form`, ``(batch, k)``."""
        return torch.diagonal(self.square_form(W), dim1=-2, dim2=-1)

    def quadratic(self, delta: Tensor) -> Tensor:
        """``delta^T P delta`` for ``delta`` ``(P,)``: ``()``."""
        raise NotImplementedError

    def sample_deviations(self, eps: Tensor) -> Tensor:
        """Rows of standard-normal ``eps`` ``(n, P)`` mapped to rows with
        covariance ``Sigma = P^{-1}``; a new tensor."""
        raise NotImplementedError

    def layer_blocks(self, params: Sequence[Tensor]) -> list | None:
        """Per parameter tensor, the covariance block in an eigenbasis
        (:class:`~laplace.parametric.fast_glm.Block`), when ``Sigma`` is
        block-diagonal over the parameter tensors; else ``None``."""
        return None

    def covariance(self) -> Tensor:
        """Dense ``Sigma``, ``(P, P)``."""
        raise NotImplementedError


class PosteriorStructure:
    """The strategy of one structure (see the module docstring). Instances
    carry the structure's options (``damping``, ``low_rank``)."""

    #: ``hessian_structure`` of the ``Laplace`` factory
    name: ClassVar[str]
    #: whether a per-parameter prior keeps the structure
    per_parameter_prior: ClassVar[bool] = True
    #: why ``fit(..., override=False)`` is refused, if it is
    continuation_error: ClassVar[str | None] = None
    #: the backend method giving a batch's curvature in this shape
    backend_method: ClassVar[str]

    def __init__(self, options: dict[str, Any]) -> None:
        """``options``: the bound constructor keywords of the class."""

    def backend_options(self, backend_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the backend, from ``backend_kwargs``."""
        return dict(backend_kwargs)

    # ---- fit --------------------------------------------------------------------------
    def zero(self, layout: Layout, device: Any, dtype: Any) -> Any:
        """A zero curvature (the posterior before ``fit``)."""
        raise NotImplementedError

    def accumulator(self, layout: Layout, device: Any, dtype: Any) -> Any:
        """Where ``fit`` starts summing the batches' curvature."""
        return self.zero(layout, device, dtype)

    def batch(
        self, backend: Any, X: Any, y: Tensor, N: int, dtype: torch.dtype
    ) -> tuple[Tensor, Any]:
        """Loss ``()`` and curvature of one batch (of a data set of size ``N``)."""
        loss, H = getattr(backend, self.backend_method)(X, y)
        return loss, H.to(dtype)

    def add(self, total: Any, batch: Any) -> Any:
        return total + batch

    def carried(self, H: Any, n_old: int, n_new: int) -> Any:
        """The curvature of ``n_old`` points, to be added to that of ``n_new``
        more (``fit(..., override=False)``)."""
        return H

    def tensors(self, H: Any) -> list[Tensor]:
        """The accumulated curvature as tensors (summed across ranks)."""
        if not isinstance(H, Tensor):
            raise NotImplementedError(
                f"hessian_structure={self.name!r} does not support distributed fitting."
            )
        return [H]

    def rebuild(self, H: Any, tensors: list[Tensor]) -> Any:
        """Curvature like ``H`` made of ``tensors`` (from :meth:`tensors`)."""
        return tensors[0]

    def is_finite(self, H: Any) -> bool:
        return bool(torch.isfinite(H).all())

    def finish(self, total: Any, layout: Layout, device: Any, dtype: Any) -> Any:
        """The curvature kept after ``fit`` from the accumulated ``total`` (run
        with the model in eval mode, autograd on)."""
        return total

    # ---- posterior ---------------------------------------------------------------------
    def precision(
        self,
        H: Any,
        factor: Tensor,
        prior_precision: Tensor,
        layout: Layout,
        memo: Memo,
    ) -> Precision:
        """``P = factor * H + prior`` with the prior precision ``(1,)``, one per
        prior group or one per parameter (see :class:`Layout`); ``memo``
        caches what depends on ``H`` alone."""
        raise NotImplementedError

    def public(self, H: Any, memo: Memo) -> Any:
        """What ``la.H`` shows for the curvature ``H``."""
        return H

    def spectrum(self, H: Any, memo: Memo) -> Spectrum | None:
        """Eigenvalues of ``H`` for the closed-form prior tuning, or ``None``."""
        return None

    # ---- checkpoints --------------------------------------------------------------------
    def saved(self, H: Any) -> Any:
        """``state_dict()['H']``."""
        return H

    def loaded(self, value: Any, layout: Layout, like: Tensor) -> Any:
        """The curvature from ``state_dict['H']``, checked against ``layout``
        and copied to the device and dtype of ``like``; ``ValueError`` (or
        ``TypeError``) naming the entry otherwise."""
        raise NotImplementedError
