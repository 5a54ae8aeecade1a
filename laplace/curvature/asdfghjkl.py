"""Names of laplace-torch's backends on the old, git-only ``asdfghjkl`` package.

That package (module ``asdfghjkl``, installed from
``git+https://github.com/wiseodd/asdl@asdfghjkl``) is unmaintained and not on
PyPI; its successor is ASDL (PyPI ``asdfghjkl``, module ``asdl``), which
:mod:`laplace.curvature.asdl` drives.  The classes here keep laplace-torch's
import paths working and fail at construction with an actionable error:
``ImportError`` when the old package is absent, ``NotImplementedError`` when it
is present (laplace-ng does not drive it).
"""

from __future__ import annotations

import importlib.util

from torch import nn

from laplace.curvature.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils.enums import Likelihood

__all__ = [
    "AsdfghjklEF",
    "AsdfghjklGGN",
    "AsdfghjklHessian",
    "AsdfghjklInterface",
]

_REPLACEMENTS = {
    "AsdfghjklInterface": "AsdlInterface",
    "AsdfghjklGGN": "AsdlGGN",
    "AsdfghjklEF": "AsdlEF",
    "AsdfghjklHessian": "AsdlHessian",
}


def _refuse(name: str) -> None:
    replacement = _REPLACEMENTS.get(name, "AsdlGGN")
    alternatives = (
        f"Use {replacement} (its maintained successor ASDL: `pip install "
        "asdfghjkl`, module `asdl`) or the default CurvlinopsGGN; LowRankLaplace "
        "works with the curvlinops backends."
    )
    if importlib.util.find_spec("asdfghjkl") is None:
        raise ImportError(
            f"{name} needs the old, git-only `asdfghjkl` package (module "
            "`asdfghjkl`), which is not installed: `pip install "
            f"git+https://git@github.com/wiseodd/asdl@asdfghjkl`. {alternatives}"
        )
    raise NotImplementedError(
        f"{name}: laplace-ng does not drive the unmaintained, git-only `asdfghjkl` "
        f"package. {alternatives}"
    )


class AsdfghjklInterface(CurvatureInterface):
    """Placeholder for laplace-torch's ``AsdfghjklInterface``; see module docs."""

    def __init__(
        self, model: nn.Module, likelihood: Likelihood | str, *args, **kwargs
    ) -> None:
        _refuse(type(self).__name__)


class AsdfghjklGGN(AsdfghjklInterface, GGNInterface):
    """Placeholder for laplace-torch's ``AsdfghjklGGN``; use :class:`AsdlGGN`."""


class AsdfghjklEF(AsdfghjklInterface, EFInterface):
    """Placeholder for laplace-torch's ``AsdfghjklEF``; use :class:`AsdlEF`."""


class AsdfghjklHessian(AsdfghjklInterface):
    """Placeholder for laplace-torch's ``AsdfghjklHessian``; use :class:`AsdlHessian`."""
