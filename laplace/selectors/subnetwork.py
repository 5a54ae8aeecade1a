"""The subnetwork selector: a Gaussian over chosen entries of the flattened
vector of trainable parameters, all others fixed at the MAP (Daxberger et al.,
2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from laplace.selectors.selector import ParameterSelector
from laplace.structures.protocol import Layout
from laplace.utils.utils import trainable_parameters

__all__ = ["Subnetwork", "check_subnetwork_indices"]


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


class Subnetwork(ParameterSelector):
    """``subset_of_weights='subnetwork'`` (keyword ``subnetwork_indices``; a GGN
    or EF backend; ``asdl_fisher_kwargs`` must be ``None``).

    The layout's ``params`` are all trainable parameters (samples and the ``nn``
    predictive replace all of them), its ``n_params`` the subnetwork size ``K``.
    """

    subset = "subnetwork"

    def __init__(self, options: dict[str, Any]) -> None:
        from laplace.curvature.curvature import EFInterface, GGNInterface

        if options["asdl_fisher_kwargs"] is not None:
            raise ValueError("asdl_fisher_kwargs must be None for subnetwork Laplace.")
        backend = options["backend"]
        if backend is not None and not (
            isinstance(backend, type)
            and issubclass(backend, GGNInterface | EFInterface)
        ):
            raise ValueError(
                "Subnetwork Laplace supports GGN and empirical Fisher backends only "
                f"(e.g. CurvlinopsGGN, CurvlinopsEF); got backend={backend!r}."
            )
        super().__init__(options)
        params = trainable_parameters(self.model)
        if not params:
            raise ValueError("The model has no parameter with requires_grad=True.")
        indices = check_subnetwork_indices(
            options["subnetwork_indices"], sum(p.numel() for p in params)
        )
        self.indices = indices.to(params[0].device)

    def layout(self) -> Layout:
        params = tuple(trainable_parameters(self.model))
        K = len(self.indices)
        return Layout(params, K, (K,))

    def prior_lengths(self, layout: Layout, precision: bool) -> dict[int, str]:
        return {1: "scalar", layout.n_params: "one per subnetwork parameter"}

    def coordinates(self, theta: Tensor) -> Tensor:
        # full-length vectors (as sample returns them): their subnetwork entries
        if theta.shape[-1] != len(self.indices):
            return theta[..., self.indices]
        return theta

    def full_vectors(self, coords: Tensor, mean: Tensor) -> Tensor:
        full = mean.expand(len(coords), -1).clone()
        full[:, self.indices] = coords.to(full.dtype)
        return full

    def backend_options(self) -> dict[str, Any]:
        return {"subnetwork_indices": self.indices}

    def extra_state(self, first_batch: list | None) -> dict[str, Any]:
        return {"subnetwork_indices": self.indices}

    def prepare_load(self, state_dict: dict[str, Any], device: Any) -> bool:
        # laplace-torch's state dicts have no indices: this object's are used
        if "subnetwork_indices" not in state_dict:
            return False
        n_all = sum(p.numel() for p in trainable_parameters(self.model))
        try:
            saved = check_subnetwork_indices(state_dict["subnetwork_indices"], n_all)
        except ValueError as error:
            raise ValueError(
                f"State dict entry 'subnetwork_indices': {error}"
            ) from None
        if not torch.equal(saved.to(self.indices.device), self.indices):
            raise ValueError(
                "State dict was fitted on other subnetwork_indices than this "
                "SubnetLaplace uses."
            )
        return False
