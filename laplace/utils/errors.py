"""Exception types of the public API."""

from __future__ import annotations

__all__ = ["UnknownKeyError"]


class UnknownKeyError(KeyError, ValueError):
    """A key or name that does not exist: a batch without ``dict_key_y``, a
    module, parameter or last-layer name that is not in the model.

    Both a ``KeyError`` (what laplace-torch raises for a missing batch key) and a
    ``ValueError`` (a bad argument), so either ``except`` clause catches it.
    """

    def __str__(self) -> str:
        # KeyError's own __str__ shows the repr of the message, quotes included
        return str(self.args[0]) if self.args else ""
