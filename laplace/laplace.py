"""laplace-torch import path ``laplace.laplace`` (re-exports the factory)."""

from laplace.factory import Laplace

__all__ = ["Laplace"]
