"""The ``Laplace`` factory: pick the approximation class from user choices."""

from __future__ import annotations

from typing import Any

from torch import nn

from laplace.base import BaseLaplace
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    SubsetOfWeights,
)

__all__ = ["Laplace"]


def _registry() -> dict[tuple[str, str], type[BaseLaplace]]:
    """Every concrete class with a ``_key = (subset_of_weights, structure)``."""
    found: dict[tuple[str, str], type[BaseLaplace]] = {}
    stack = [BaseLaplace]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        key = cls.__dict__.get("_key")
        if key is not None:
            found.setdefault(key, cls)
    return found


_FUNCTIONAL_KEYS = {
    FunctionalApproximation.SOD: None,
    FunctionalApproximation.NYSTROM: "ELLA",
    FunctionalApproximation.VARIATIONAL: "VaLLA",
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
    registry = _registry()
    if structure is HessianStructure.GP and _FUNCTIONAL_KEYS[approximation]:
        if subset is not SubsetOfWeights.ALL:
            raise ValueError(
                f"functional_approximation={approximation.value!r} needs "
                f"subset_of_weights='all'; got {subset.value!r}."
            )
        key = ("all", approximation.value)
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
