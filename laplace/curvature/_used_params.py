"""Parameters a forward pass actually used, and curvature operators over the used
ones padded to all.

A registered parameter the forward never touches (a submodule never called, a
head only some tasks use) has zero curvature from the data: only the prior
acts on it. curvlinops' operators differentiate w.r.t. the parameters they are
given and fail on unused ones, so they get the used ones and their products are
padded with zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["reached_parameters", "PaddedOperator", "used_positions"]


def reached_parameters(output: Tensor, params: list[Tensor]) -> list[bool]:
    """Whether each of ``params`` is a leaf of ``output``'s autograd graph (a
    walk over the graph's nodes; no backward pass)."""
    index = {id(p): i for i, p in enumerate(params)}
    reached = [False] * len(params)
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and id(variable) in index:
            reached[index[id(variable)]] = True
        stack.extend(child for child, _ in node.next_functions)
    return reached


class PaddedOperator:
    """``op`` over the rows ``used`` of an ``(n, n)`` operator that is zero
    elsewhere: ``self @ V`` for ``V (n, k)`` (or ``(n,)``) is ``op @ V[used]``
    scattered into zeros."""

    def __init__(self, op, used: Tensor, n: int) -> None:
        self.op, self.used, self.n = op, used, n

    def __matmul__(self, V: Tensor) -> Tensor:
        out = V.new_zeros(V.shape)
        if len(self.used):
            out[self.used] = self.op @ V[self.used]
        return out


def used_positions(params: list[Tensor], used: list[bool]) -> Tensor:
    """Positions ``(n_used_entries,)`` of the used parameters' entries in the
    flattened vector of all ``params``."""
    device = params[0].device if params else None
    chunks, start = [], 0
    for p, u in zip(params, used):
        if u:
            chunks.append(torch.arange(start, start + p.numel(), device=device))
        start += p.numel()
    if not chunks:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(chunks)
