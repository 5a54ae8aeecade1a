"""The one check of training and validation targets against the likelihood and
the model's number of outputs (used by ``fit``, the function-space classes and
the grid search of ``optimize_prior_precision``)."""

from __future__ import annotations

import torch

from laplace.utils.enums import Likelihood

__all__ = ["check_class_labels", "check_regression_targets", "check_targets"]


def check_class_labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Check class-index targets ``(batch,)`` with values in ``[0, n_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(
            "Classification targets must be a 1-d integer tensor of class indices; "
            f"got {type(y).__name__}."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(
            "Classification targets must be a 1-d integer tensor of class indices; "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"Classification targets must lie in [0, {n_classes}); got values in "
            f"[{int(y.min())}, {int(y.max())}]."
        )
    return y


def check_regression_targets(y: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """Regression targets as ``(batch, n_outputs)``; ``(batch,)`` means one output
    and becomes ``(batch, 1)``. Never broadcast."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(
            f"Regression targets must be a float tensor of shape (batch, {n_outputs});"
            f" got {type(y).__name__}."
        )
    if y.ndim == 1 and n_outputs == 1:
        y = y.unsqueeze(-1)
    if y.ndim != 2 or y.shape[-1] != n_outputs or not y.is_floating_point():
        raise ValueError(
            f"Regression targets must be a float tensor of shape (batch, {n_outputs}) "
            f"to match the model output; got dtype {y.dtype} and shape "
            f"{tuple(y.shape)}."
        )
    return y


def check_targets(
    y: torch.Tensor, likelihood: Likelihood | str, n_outputs: int
) -> torch.Tensor:
    """Check a batch of targets and return them in the shape the curvature and
    the metrics expect.

    Parameters
    ----------
    y : Tensor
        Classification: class indices ``(batch,)``. Regression: ``(batch,
        n_outputs)`` (or ``(batch,)`` for one output). Reward modelling: the
        index ``(batch,)`` of the preferred item of each pair, 0 or 1.
    likelihood : Likelihood or str
    n_outputs : int
        Number of model outputs (classes for classification).

    Returns
    -------
    Tensor
        ``y``, regression targets as ``(batch, n_outputs)``.

    Raises
    ------
    ValueError
        Wrong dtype, shape or class index.
    """
    likelihood = Likelihood.parse(likelihood, "likelihood")
    if likelihood is Likelihood.REGRESSION:
        return check_regression_targets(y, n_outputs)
    if likelihood is Likelihood.REWARD_MODELING:
        return check_class_labels(y, 2)  # which item of the pair is preferred
    return check_class_labels(y, n_outputs)
