"""Weight-space (parametric) Laplace approximations, one module per structure."""

from laplace.parametric.base import ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.full import FullLaplace
from laplace.parametric.kron import KronLaplace

__all__ = ["ParametricLaplace", "FullLaplace", "KronLaplace", "DiagLaplace"]
