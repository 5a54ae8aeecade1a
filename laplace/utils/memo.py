"""The one memoisation rule of the package.

A cached value is a function of its inputs: :meth:`Memo.get` returns the value
computed for a name from these very inputs (tensors and other objects by
identity, numbers and strings by value) and recomputes it when any input is a
different object. Hyperparameter setters and ``fit`` always store new objects,
so nothing has to be invalidated by hand, and a rolled-back transaction cannot
leave a stale value behind (its entries belong to inputs it no longer holds).

Values that carry an autograd graph -- an input tensor requires grad while
grad mode is on -- are never kept: a graph must not outlive the step that
built it (marginal-likelihood tuning differentiates through the prior).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["Memo", "needs_graph"]

T = TypeVar("T")
_VALUES = (int, float, bool, str, type(None))


def needs_graph(inputs: Sequence[Any]) -> bool:
    """Whether a value computed from ``inputs`` now carries an autograd graph."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in inputs
    )


def _token(x: Any) -> Any:
    return x if isinstance(x, _VALUES) else id(x)


class Memo:
    """Named values, each kept for one set of inputs (see the module docstring)."""

    def __init__(self) -> None:
        # name -> (tokens, inputs kept alive so that their ids stay unique, value)
        self._entries: dict[str, tuple[tuple, tuple, Any]] = {}

    def get(self, name: str, inputs: Sequence[Any], compute: Callable[[], T]) -> T:
        """The value of ``compute()`` for ``inputs``, computed at most once while
        the inputs stay the same objects."""
        if needs_graph(inputs):
            return compute()
        tokens = tuple(_token(x) for x in inputs)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == tokens:
            return entry[2]
        value = compute()
        self._entries[name] = (tokens, tuple(inputs), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __getstate__(self) -> dict[str, Any]:
        # ids are meaningless in a copy: a copied or unpickled object recomputes
        return {"_entries": {}}
