"""laplace-torch's target helpers: regression targets shaped like the model
outputs (never broadcast) and class indices from indices or one-hot rows. (The
checks of training targets against a likelihood are
:meth:`laplace.likelihoods.LikelihoodModel.check_targets`.)"""

from __future__ import annotations

import torch

__all__ = ["regression_targets", "classification_targets"]


def regression_targets(targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``targets`` shaped like ``outputs`` without broadcasting: equal shapes, or
    ``[B]`` targets for ``[B, 1]`` outputs (one output); else ``ValueError``."""
    if targets.shape == outputs.shape:
        return targets
    if outputs.ndim >= 1 and outputs.shape[-1] == 1:
        if targets.shape == outputs.shape[:-1]:
            return targets.unsqueeze(-1)
    raise ValueError(
        f"Regression targets of shape {tuple(targets.shape)} do not match the "
        f"model outputs of shape {tuple(outputs.shape)} (only [B] targets for "
        "[B, 1] outputs are reshaped; nothing is broadcast)."
    )


def classification_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices ``[B]`` (int64) from ``[B]`` or ``[B, 1]`` indices or
    one-hot ``[B, C]`` rows; ``ValueError`` for anything else."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            f"Classification targets must be a tensor; got {type(targets).__name__}."
        )
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim == 2:
        one_hot = ((targets == 0) | (targets == 1)).all() and bool(
            (targets.sum(-1) == 1).all()
        )
        if not one_hot:
            raise ValueError(
                f"Classification targets of shape {tuple(targets.shape)} must be "
                "one-hot rows (a single 1 per row, zeros elsewhere)."
            )
        return targets.argmax(-1)
    if targets.ndim != 1 or targets.is_complex():
        raise ValueError(
            "Classification targets must be [B] or [B, 1] class indices or one-hot "
            f"[B, C]; got shape {tuple(targets.shape)} and dtype {targets.dtype}."
        )
    if targets.is_floating_point() and not bool((targets == targets.round()).all()):
        raise ValueError("Classification targets must be whole numbers (classes).")
    if len(targets) and bool((targets < 0).any()):
        raise ValueError(
            f"Classification targets must be non-negative; got {int(targets.min())}."
        )
    return targets.long()
