"""laplace-torch import path ``laplace.baselaplace`` (re-exports)."""

from laplace.base import BaseLaplace
from laplace.functional import ELLA, BaseFunctionalLaplace, FunctionalLaplace, VaLLA
from laplace.lowrank import LowRankLaplace
from laplace.parametric import DiagLaplace, FullLaplace, KronLaplace, ParametricLaplace

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
