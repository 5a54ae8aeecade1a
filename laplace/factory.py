"""The ``Laplace`` factory: pick the approximation class from user choices."""

from __future__ import annotations

from typing import Any

from torch import nn

from laplace.approximation import BaseLaplace
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    SubsetOfWeights,
)

__all__ = ["Laplace"]


def _table() -> dict[tuple[str, str], type[BaseLaplace]]:
    """``(subset_of_weights, hessian_structure)`` -> class; the function-space
    approximations of ``hessian_structure='gp'`` under their
    ``functional_approximation`` ('nystrom', 'variational')."""
    # imported here: the classes import this package's modules
    from laplace import functional as gp
    from laplace import parametric as weights

    by_subset = {
        "all": {
            "full": weights.FullLaplace,
            "kron": weights.KronLaplace,
            "diag": weights.DiagLaplace,
            "lowrank": weights.LowRankLaplace,
            "gp": gp.FunctionalLaplace,
        },
        "last_layer": {
            "full": weights.FullLLLaplace,
            "kron": weights.KronLLLaplace,
            "diag": weights.DiagLLLaplace,
            "gp": gp.FunctionalLLLaplace,
        },
        "subnetwork": {
            "full": weights.FullSubnetLaplace,
            "diag": weights.DiagSubnetLaplace,
        },
    }
    table = {
        (s, h): cls for s, classes in by_subset.items() for h, cls in classes.items()
    }
    # the other function-space approximations (subset 'all')
    return {**table, ("all", "nystrom"): gp.ELLA, ("all", "variational"): gp.VaLLA}


_FUNCTIONAL_KEYS = {
    FunctionalApproximation.SOD: None,
    FunctionalApproximation.NYSTROM: "nystrom",
    FunctionalApproximation.VARIATIONAL: "variational",
}


def Laplace(
    model: nn.Module,
    likelihood: Likelihood | str,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    *args: Any,
    functional_approximation: FunctionalApproximation
    | str = FunctionalApproximation.SOD,
    **kwargs: Any,
) -> BaseLaplace:
    """Create a Laplace approximation of ``model``.

    Parameters
    ----------
    model : nn.Module
    likelihood : {'classification', 'regression', 'reward_modeling'}
    subset_of_weights : {'last_layer', 'all', 'subnetwork'}, default='last_layer'
    hessian_structure : {'kron', 'full', 'diag', 'lowrank', 'gp'}, default='kron'
    functional_approximation : {'sod', 'nystrom', 'variational'}, default='sod'
        With ``hessian_structure='gp'``: subset-of-data GP (FunctionalLaplace),
        Nystrom features (ELLA) or a variational sparse GP (VaLLA); the latter two
        need ``subset_of_weights='all'``.
    *args, **kwargs
        Passed to the class constructor.
    """
    subset = SubsetOfWeights.parse(subset_of_weights, "subset_of_weights")
    structure = HessianStructure.parse(hessian_structure, "hessian_structure")
    approximation = FunctionalApproximation.parse(
        functional_approximation, "functional_approximation"
    )
    if subset is SubsetOfWeights.SUBNETWORK and structure not in (
        HessianStructure.FULL,
        HessianStructure.DIAG,
    ):
        raise ValueError(
            "subset_of_weights='subnetwork' supports hessian_structure 'full' or "
            f"'diag'; got {structure.value!r}."
        )
    registry = _table()
    if structure is HessianStructure.GP and _FUNCTIONAL_KEYS[approximation]:
        if subset is not SubsetOfWeights.ALL:
            raise ValueError(
                f"functional_approximation={approximation.value!r} needs "
                f"subset_of_weights='all'; got {subset.value!r}."
            )
        key = ("all", _FUNCTIONAL_KEYS[approximation])
    else:
        key = (subset.value, structure.value)
    if key not in registry:
        available = sorted(
            k for k in registry if k[1] not in ("nystrom", "variational")
        )
        raise ValueError(
            f"No Laplace approximation for subset_of_weights={subset.value!r} and "
            f"hessian_structure={structure.value!r}; available combinations: "
            f"{available}."
        )
    return registry[key](model, likelihood, *args, **kwargs)
