"""laplace-torch import path ``laplace.baselaplace`` (re-exports)."""

from laplace.approximation import BaseLaplace
from laplace.functional import ELLA, BaseFunctionalLaplace, FunctionalLaplace, VaLLA
from laplace.parametric import (
    DiagLaplace,
    FullLaplace,
    KronLaplace,
    LowRankLaplace,
    ParametricLaplace,
)

__all__ = [
    "BaseLaplace",
    "ParametricLaplace",
    "FullLaplace",
    "KronLaplace",
    "DiagLaplace",
    "LowRankLaplace",
    "BaseFunctionalLaplace",
    "FunctionalLaplace",
    "ELLA",
    "VaLLA",
]
