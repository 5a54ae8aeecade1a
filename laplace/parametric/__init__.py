"""Weight-space (parametric) Laplace approximations: one ``ParametricLaplace``
over a parameter selector and a posterior structure, and the public classes
that fix them."""

from laplace.parametric.classes import (
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    KronLaplace,
    KronLLLaplace,
    LLLaplace,
    LowRankLaplace,
    SubnetLaplace,
)
from laplace.parametric.posterior import ParametricLaplace

__all__ = [
    "ParametricLaplace",
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
