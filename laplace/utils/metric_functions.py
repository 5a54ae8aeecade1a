"""Evaluation metrics of predictions as functions of tensors: accuracy, NLL,
Brier score, calibration errors and reliability-diagram data, OOD AUROC and
the Gaussian NLL (torchmetrics' where it has the metric; see
:mod:`laplace.utils.metrics`). They validate their inputs (a clear
``ValueError`` before any work) and return Python floats."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

__all__ = [
    "accuracy",
    "nll",
    "brier_score",
    "expected_calibration_error",
    "maximum_calibration_error",
    "ece",
    "mce",
    "reliability_diagram_data",
    "ood_auroc",
    "gaussian_nll",
]


def check_targets_dtype(targets: Tensor) -> None:
    if (
        targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        raise ValueError(
            f"targets must be an integer tensor of class indices, got dtype {targets.dtype}."
        )


def check_classification(probs: Tensor, targets: Tensor) -> None:
    """Validate ``probs`` ``(N, C)`` and ``targets`` ``(N,)`` for the functional metrics."""
    if probs.ndim != 2:
        raise ValueError(
            f"probs must have shape (N, n_classes), got shape {tuple(probs.shape)}."
        )
    if targets.ndim != 1 or targets.shape[0] != probs.shape[0]:
        raise ValueError(
            f"targets must have shape (N,) = ({probs.shape[0]},) to match probs "
            f"{tuple(probs.shape)}, got shape {tuple(targets.shape)}."
        )
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(
            f"probs must be non-empty, got shape {tuple(probs.shape)} "
            "(need at least one sample and one class)."
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor, got dtype {probs.dtype}.")
    check_targets_dtype(targets)
    n_classes = probs.shape[1]
    if bool(((targets < 0) | (targets >= n_classes)).any()):
        raise ValueError(
            f"targets must be class indices in [0, {n_classes - 1}], got values in "
            f"[{int(targets.min())}, {int(targets.max())}]."
        )
    # Catches logits passed by mistake (torchmetrics would silently apply a
    # softmax to them); exact normalisation is not enforced because
    # low-precision probabilities rarely sum to exactly one.
    if bool(((probs < 0) | (probs > 1)).any()) or bool(probs.isnan().any()):
        raise ValueError(
            "probs must contain probabilities in [0, 1] (did you pass logits?), got "
            f"values in [{float(probs.min())}, {float(probs.max())}]."
        )


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, "
            f"got shape {tuple(b.shape)}."
        )


def check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")


def log_prob_of_targets(probs: Tensor, targets: Tensor) -> Tensor:
    """``log probs[i, targets[i]]`` with probabilities clamped away from zero, ``(N,)``."""
    picked = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # Clamping keeps a single confidently wrong prediction from turning the
    # mean into +inf.
    return picked.clamp_min(torch.finfo(probs.dtype).tiny).log()


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose arg-max class equals the target.

    torchmetrics' ``multiclass_accuracy`` with micro averaging.

    Parameters
    ----------
    probs : Tensor
        Class probabilities, shape ``(N, n_classes)``.
    targets : Tensor
        Integer class indices, shape ``(N,)``.
    """
    check_classification(probs, targets)
    return float(
        multiclass_accuracy(
            probs, targets, probs.shape[1], average="micro", validate_args=False
        )
    )


def nll(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood ``-mean_i log probs[i, targets[i]]``.

    Shapes as in :func:`accuracy`. Probabilities are clamped at the smallest
    positive normal number of their dtype, so the result is always finite.
    """
    check_classification(probs, targets)
    return float(-log_prob_of_targets(probs, targets).mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over samples of ``sum_c (probs[i, c] - onehot(targets[i])_c)^2``.

    Shapes as in :func:`accuracy`; ranges over ``[0, 2]``.
    """
    check_classification(probs, targets)
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).square().sum(dim=-1).mean())


def expected_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    torchmetrics' ``multiclass_calibration_error`` (``norm='l1'``): ``n_bins``
    equal-width bins ``[lo, hi)`` on ``[0, 1]`` over the maximum probability
    (confidence), computed in float32; shapes as in :func:`accuracy`.
    """
    return _calibration_error(probs, targets, n_bins, "l1")


def maximum_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins.

    torchmetrics' ``multiclass_calibration_error`` (``norm='max'``); arguments
    as in :func:`expected_calibration_error`.
    """
    return _calibration_error(probs, targets, n_bins, "max")


def _calibration_error(probs: Tensor, targets: Tensor, n_bins: int, norm: str) -> float:
    check_classification(probs, targets)
    check_n_bins(n_bins)
    value = multiclass_calibration_error(
        probs, targets, probs.shape[1], n_bins=n_bins, norm=norm, validate_args=False
    )
    return float(value)


ece = expected_calibration_error
mce = maximum_calibration_error


def reliability_diagram_data(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> dict[str, Tensor]:
    """Per-bin statistics for a reliability diagram.

    Bins as in :func:`expected_calibration_error` (``[lo, hi)``, the confidence
    1 in the last bin), so ``sum_b count_b |accuracy_b - confidence_b| / N`` is
    the ECE. torchmetrics does not expose the per-bin values.

    Parameters
    ----------
    probs, targets, n_bins
        As in :func:`expected_calibration_error`.

    Returns
    -------
    dict
        ``"bin_edges"`` ``(n_bins + 1,)``; ``"accuracy"`` and ``"confidence"``
        ``(n_bins,)``, the mean correctness and mean confidence per bin (NaN for
        empty bins) in the dtype of ``probs``; ``"count"`` ``(n_bins,)`` int64
        number of samples per bin.
    """
    check_classification(probs, targets)
    check_n_bins(n_bins)
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == targets).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, device=probs.device, dtype=probs.dtype)
    bin_index = torch.bucketize(confidence, edges[1:-1], right=True)
    zeros = torch.zeros(n_bins, device=probs.device, dtype=probs.dtype)
    count = torch.bincount(bin_index, minlength=n_bins)
    denom = count.to(probs.dtype)
    # 0/0 gives NaN for empty bins, which is the honest "no data" marker.
    return {
        "bin_edges": edges,
        "accuracy": zeros.index_add(0, bin_index, correct) / denom,
        "confidence": zeros.index_add(0, bin_index, confidence) / denom,
        "count": count,
    }


def _check_scores(name: str, scores: Tensor) -> None:
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-d tensor of shape (n,), got shape "
            f"{tuple(scores.shape)}."
        )
    if scores.is_floating_point() and bool(scores.isnan().any()):
        raise ValueError(f"{name} must not contain NaN.")


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for telling in- from out-of-distribution inputs.

    torchmetrics' ``binary_auroc`` with in-distribution as the positive class;
    equals ``P(s_in > s_out) + P(s_in == s_out) / 2`` over all pairs.

    Parameters
    ----------
    scores_in : Tensor
        Scores of in-distribution inputs, shape ``(N,)``; higher means more
        in-distribution (e.g. the maximum predicted probability).
    scores_out : Tensor
        Scores of out-of-distribution inputs, shape ``(M,)``.
    """
    _check_scores("scores_in", scores_in)
    _check_scores("scores_out", scores_out)
    scores_out = scores_out.to(device=scores_in.device)
    dtype = torch.promote_types(scores_in.dtype, scores_out.dtype)
    all_scores = torch.cat([scores_in.to(dtype), scores_out.to(dtype)])
    # The AUROC depends only on the order of the scores. Ranks scaled to [0, 1]
    # keep order and ties exactly and stop binary_auroc from squashing scores
    # outside [0, 1] through a sigmoid, which would merge large distinct scores.
    _, rank = torch.unique(all_scores, sorted=True, return_inverse=True)
    rank = rank.to(torch.float64) / max(int(rank.max()), 1)
    labels = torch.zeros_like(rank, dtype=torch.long)
    labels[: scores_in.shape[0]] = 1
    return float(binary_auroc(rank, labels, validate_args=False))


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian negative log-likelihood of ``targets`` under ``N(mean, var)``.

    Averages ``0.5 log(2 pi var) + (y - mean)^2 / (2 var)`` over all elements
    (``torch.nn.functional.gaussian_nll_loss`` with ``full=True``; torchmetrics
    has no Gaussian NLL).

    Parameters
    ----------
    mean : Tensor
        Predictive means, shape ``(N, ...)``.
    var : Tensor
        Predictive variances (observation noise included if it should count),
        same shape as ``mean``; use the diagonal of a predictive covariance.
    targets : Tensor
        Observed targets, same shape as ``mean``.
    """
    check_same_shape("mean", mean, "var", var)
    check_same_shape("mean", mean, "targets", targets)
    if mean.numel() == 0:
        raise ValueError(f"mean must be non-empty, got shape {tuple(mean.shape)}.")
    if not bool((var > 0).all()):
        raise ValueError(
            f"var must be strictly positive, got minimum value {float(var.min())}."
        )
    return float(F.gaussian_nll_loss(mean, targets, var, full=True, eps=0.0))
