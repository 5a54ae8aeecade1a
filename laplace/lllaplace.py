"""laplace-torch import path ``laplace.lllaplace`` (re-exports)."""

from laplace.functional import FunctionalLLLaplace
from laplace.parametric import DiagLLLaplace, FullLLLaplace, KronLLLaplace, LLLaplace

__all__ = [
    "LLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "DiagLLLaplace",
    "FunctionalLLLaplace",
]
