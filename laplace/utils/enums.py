"""String-valued enums for every user-facing choice.

Each enum subclasses ``str`` so that ``Likelihood.CLASSIFICATION == "classification"``
and plain strings are accepted wherever an enum is. :meth:`_ChoiceEnum.parse`
validates a user value once, at the API boundary, with an error that names the
argument, the value and what is allowed.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "SubsetOfWeights",
    "HessianStructure",
    "FunctionalApproximation",
    "Likelihood",
    "PredType",
    "LinkApprox",
    "TuningMethod",
    "PriorStructure",
    "FeatureReduction",
]

E = TypeVar("E", bound="_ChoiceEnum")


class _ChoiceEnum(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[E], value: E | str, argname: str | None = None) -> E:
        """Return the member for ``value`` (member or its string alias).

        Raises
        ------
        ValueError
            If ``value`` is not one of the allowed choices.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        name = argname or cls.__name__
        raise ValueError(f"Invalid {name}={value!r}; allowed values are {allowed}.")


class SubsetOfWeights(_ChoiceEnum):
    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


class HessianStructure(_ChoiceEnum):
    FULL = "full"
    KRON = "kron"
    DIAG = "diag"
    LOWRANK = "lowrank"
    GP = "gp"


class FunctionalApproximation(_ChoiceEnum):
    SOD = "sod"
    NYSTROM = "nystrom"
    VARIATIONAL = "variational"


class Likelihood(_ChoiceEnum):
    REGRESSION = "regression"
    CLASSIFICATION = "classification"
    REWARD_MODELING = "reward_modeling"


class PredType(_ChoiceEnum):
    GLM = "glm"
    NN = "nn"
    GP = "gp"


class LinkApprox(_ChoiceEnum):
    MC = "mc"
    PROBIT = "probit"
    BRIDGE = "bridge"
    BRIDGE_NORM = "bridge_norm"


class TuningMethod(_ChoiceEnum):
    MARGLIK = "marglik"
    GRIDSEARCH = "gridsearch"


class PriorStructure(_ChoiceEnum):
    SCALAR = "scalar"
    DIAG = "diag"
    LAYERWISE = "layerwise"


class FeatureReduction(_ChoiceEnum):
    PICK_FIRST = "pick_first"
    PICK_LAST = "pick_last"
    AVERAGE = "average"
