"""Function-space (GP) Laplace approximations of the linearised network."""

from laplace.functional.ella import ELLA
from laplace.functional.function_space import BaseFunctionalLaplace
from laplace.functional.sod import FunctionalLaplace
from laplace.functional.sod_last_layer import FunctionalLLLaplace
from laplace.functional.valla import VaLLA

__all__ = [
    "BaseFunctionalLaplace",
    "ELLA",
    "FunctionalLaplace",
    "FunctionalLLLaplace",
    "VaLLA",
]
