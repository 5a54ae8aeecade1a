"""Comparing configurations kept in checkpoints: nested mappings and sequences
of numbers, strings and tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["same_configuration"]


def same_configuration(left: Any, right: Any) -> bool:
    """Whether two configurations (nested mappings and sequences of numbers,
    strings and tensors) are equal; tensors must agree in shape and values."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
            return False
        return left.shape == right.shape and bool(
            torch.equal(left.detach().cpu(), right.detach().cpu())
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(
            same_configuration(left[k], right[k]) for k in left
        )
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            same_configuration(a, b) for a, b in zip(left, right)
        )
    return left == right
