"""Subnetwork Laplace: a Gaussian over a chosen subset of the weights, the rest
fixed at the MAP (Daxberger et al., 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace.curvature.curvature import EFInterface, GGNInterface
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.full import FullLaplace
from laplace.signatures import SUBNETWORK, constructor
from laplace.utils.utils import trainable_parameters

__all__ = [
    "SubnetLaplace",
    "FullSubnetLaplace",
    "DiagSubnetLaplace",
    "check_subnetwork_indices",
]


def check_subnetwork_indices(indices: Any, n_params: int) -> torch.LongTensor:
    """Validate subnetwork indices into a flattened vector of ``n_params`` entries.

    Returns
    -------
    LongTensor
        ``indices`` as `(K,)` int64, order kept.

    Raises
    ------
    ValueError
        Unless ``indices`` is a non-empty 1-d integer tensor of distinct values in
        ``[0, n_params)``.
    """
    if not isinstance(indices, torch.Tensor):
        raise ValueError(
            "subnetwork_indices must be a torch.LongTensor; got "
            f"{type(indices).__name__}."
        )
    if (
        indices.dtype == torch.bool
        or indices.is_floating_point()
        or indices.is_complex()
    ):
        raise ValueError(
            f"subnetwork_indices must have an integer dtype; got {indices.dtype} "
            "(turn a boolean mask into indices with mask.nonzero().flatten())."
        )
    if indices.ndim != 1:
        raise ValueError(
            f"subnetwork_indices must be 1-d; got shape {tuple(indices.shape)}."
        )
    if indices.numel() == 0:
        raise ValueError("subnetwork_indices must not be empty.")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= n_params:
        raise ValueError(
            f"subnetwork_indices must lie in [0, {n_params}) (the number of "
            f"trainable parameters); got values in [{low}, {high}]."
        )
    if indices.unique().numel() != indices.numel():
        raise ValueError("subnetwork_indices must not contain duplicates.")
    return indices.long()


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

    __init__ = constructor(SUBNETWORK)

    def _setup(self, options: dict[str, Any]) -> None:
        model, backend = options["model"], options["backend"]
        if options["asdl_fisher_kwargs"] is not None:
            raise ValueError("asdl_fisher_kwargs must be None for subnetwork Laplace.")
        if backend is not None and not (
            isinstance(backend, type)
            and issubclass(backend, GGNInterface | EFInterface)
        ):
            raise ValueError(
                "Subnetwork Laplace supports GGN and empirical Fisher backends only "
                f"(e.g. CurvlinopsGGN, CurvlinopsEF); got backend={backend!r}."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        params = trainable_parameters(model)
        if not params:
            raise ValueError("The model has no parameter with requires_grad=True.")
        indices = check_subnetwork_indices(
            options["subnetwork_indices"], sum(p.numel() for p in params)
        )
        self.subnetwork_indices = indices.to(params[0].device)
        self.n_params_subnet = len(indices)
        super()._setup({**options, "asdl_fisher_kwargs": None})

    # ---- parameters and prior -------------------------------------------------------
    def _init_params(self) -> None:
        super()._init_params()
        # the Gaussian lives on the subnetwork; `mean` stays the full MAP vector
        self.n_params = self.n_params_subnet

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return {
            **super()._backend_init_kwargs(),
            "subnetwork_indices": self.subnetwork_indices,
        }

    def _prior_precision_lengths(self) -> dict[int, str] | None:
        if self.n_params is None:
            return None
        return {1: "scalar", self.n_params_subnet: "one per subnetwork parameter"}

    _prior_mean_lengths = _prior_precision_lengths

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """The prior precision expanded to ``(n_params_subnet,)``."""
        return self.prior_precision.expand(self.n_params_subnet)

    @property
    def mean_subnet(self) -> torch.Tensor:
        """MAP values of the subnetwork parameters, ``(n_params_subnet,)``."""
        return self.mean[self.subnetwork_indices]

    @property
    def _prior_deviation(self) -> torch.Tensor:
        return self.mean_subnet - self.prior_mean

    def _precision_square_form(self, delta: torch.Tensor) -> torch.Tensor:
        return super()._precision_square_form(self._prior_coordinates(delta))

    def _prior_coordinates(self, value: torch.Tensor) -> torch.Tensor:
        # log_prob gets full-length values (as returned by sample): the Gaussian
        # only sees their subnetwork entries
        if value.shape[-1] != self.n_params_subnet:
            return value[..., self.subnetwork_indices]
        return value

    # ---- sampling ------------------------------------------------------------------
    def assemble_full_samples(self, subnet_samples: torch.Tensor) -> torch.Tensor:
        """Full parameter vectors from subnetwork samples: ``(n_samples, K)`` ->
        ``(n_samples, n_params_all)``, the other entries at the MAP."""
        full = self.mean.expand(len(subnet_samples), -1).clone()
        full[:, self.subnetwork_indices] = subnet_samples.to(full.dtype)
        return full

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Full weight samples ``(n_samples, n_params_all)``: subnetwork entries
        drawn from the posterior, all others at the MAP."""
        self._check_sampling_args(n_samples, generator, minimum=0)
        self._check_fitted()
        self._check_sample_memory(n_samples, self.n_params_subnet + len(self.mean))
        eps = torch.randn(
            n_samples,
            self.n_params_subnet,
            device=self._device,
            dtype=self._dtype,
            generator=generator,
        )
        return self._to_output(
            self.assemble_full_samples(self.mean_subnet + self._sample_deviations(eps))
        )

    # ---- checkpoints ------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {"subnetwork_indices": self.subnetwork_indices}

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        # laplace-torch's state dicts have no indices: this object's are used
        if "subnetwork_indices" not in state_dict:
            return
        try:
            saved = check_subnetwork_indices(
                state_dict["subnetwork_indices"], sum(self._layer_sizes)
            )
        except ValueError as error:
            raise ValueError(
                f"State dict entry 'subnetwork_indices': {error}"
            ) from None
        if not torch.equal(
            saved.to(self.subnetwork_indices.device), self.subnetwork_indices
        ):
            raise ValueError(
                "State dict was fitted on other subnetwork_indices than this "
                "SubnetLaplace uses."
            )


class FullSubnetLaplace(SubnetLaplace, FullLaplace):
    """Subnetwork Laplace with a dense `(K, K)` posterior precision."""

    _key = ("subnetwork", "full")


class DiagSubnetLaplace(SubnetLaplace, DiagLaplace):
    """Subnetwork Laplace with a diagonal `(K,)` posterior precision."""

    _key = ("subnetwork", "diag")
