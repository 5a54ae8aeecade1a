"""Curvature backends: GGN, empirical Fisher and Hessian of the summed loss."""

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.curvature.curvlinops import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "CurvlinopsInterface",
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "CurvlinopsHessian",
]
