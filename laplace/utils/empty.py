"""Predictions on an empty batch: outputs with zero rows of the shapes a
non-empty batch would give, without running any of the predictive machinery."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["empty_output_width", "empty_predictive"]


def empty_output_width(forward: Callable[[], torch.Tensor], fallback: int) -> int:
    """The network's output width on a batch without rows: the last dimension of
    ``forward()`` (so reward models on preference pairs give 2), or ``fallback``
    when the network cannot run on zero rows."""
    try:
        with torch.no_grad():
            out = forward()
    except (RuntimeError, ValueError, IndexError):
        return fallback
    return int(out.shape[-1]) if out.ndim >= 2 else fallback


def empty_predictive(
    n_outputs: int,
    like: torch.Tensor,
    classification: bool,
    joint: bool = False,
    diagonal: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero-row predictive: probabilities ``(0, K)``; or a mean ``(0, K)`` with a
    variance ``(0, K, K)`` (``(0, K)`` with ``diagonal``), joint ``(0,)`` and
    ``(0, 0)``; on the device and in the dtype of ``like``."""

    def empty(*shape: int) -> torch.Tensor:
        return like.new_zeros(shape)

    if classification:
        return empty(0, n_outputs)
    if joint:
        return empty(0), empty(0, 0)
    if diagonal:
        return empty(0, n_outputs), empty(0, n_outputs)
    return empty(0, n_outputs), empty(0, n_outputs, n_outputs)
