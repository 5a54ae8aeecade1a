"""Weight-space (parametric) Laplace approximations: one ``ParametricLaplace``
over a parameter selector and a posterior structure, and the public classes
that fix them."""

from laplace.parametric import classes
from laplace.parametric.classes import *  # noqa: F403 (the public classes)
from laplace.parametric.weight_space import ParametricLaplace

__all__ = ["ParametricLaplace", *classes.__all__]
