"""Curvature backends: GGN, empirical Fisher and Hessian of the summed loss.

The BackPACK and ASDL backends are imported lazily, on first access to their
names, so that ``import laplace.curvature`` neither imports those optional
packages nor fails without them (their constructors raise an ImportError).
"""

from __future__ import annotations

import importlib
from typing import Any

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.curvature.curvlinops import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)

_LAZY = {
    "BackPackInterface": "laplace.curvature.backpack",
    "BackPackGGN": "laplace.curvature.backpack",
    "BackPackEF": "laplace.curvature.backpack",
    "AsdlInterface": "laplace.curvature.asdl",
    "AsdlGGN": "laplace.curvature.asdl",
    "AsdlEF": "laplace.curvature.asdl",
    "AsdlHessian": "laplace.curvature.asdl",
    "AsdfghjklInterface": "laplace.curvature.asdfghjkl",
    "AsdfghjklGGN": "laplace.curvature.asdfghjkl",
    "AsdfghjklEF": "laplace.curvature.asdfghjkl",
    "AsdfghjklHessian": "laplace.curvature.asdfghjkl",
}

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "CurvlinopsInterface",
    "CurvlinopsGGN",
    "CurvlinopsEF",
    "CurvlinopsHessian",
    *_LAZY,
]


# submodules of laplace-torch's laplace.curvature, imported on first access
_SUBMODULES = ("backpack", "asdl", "asdfghjkl")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
