"""Evaluation metrics for predictive distributions (torch only, no torchmetrics).

Two kinds of metric live here:

* running metrics (:class:`RunningNLLMetric`, :class:`RunningMSEMetric`) with the
  ``update`` / ``compute`` / ``reset`` protocol of a torchmetrics ``Metric``, so
  they can score prior-precision grid search batch by batch;
* functional metrics for classification (accuracy, NLL, Brier, calibration
  errors, OOD AUROC) and regression (Gaussian NLL) that return Python floats.

Every metric computes on the device and in the dtype of its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "RunningNLLMetric",
    "RunningMSEMetric",
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


def _check_targets_dtype(targets: Tensor) -> None:
    if (
        targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        raise ValueError(
            f"targets must be an integer tensor of class indices, got dtype {targets.dtype}."
        )


def _check_classification(probs: Tensor, targets: Tensor) -> None:
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
    _check_targets_dtype(targets)
    n_classes = probs.shape[1]
    if bool(((targets < 0) | (targets >= n_classes)).any()):
        raise ValueError(
            f"targets must be class indices in [0, {n_classes - 1}], got values in "
            f"[{int(targets.min())}, {int(targets.max())}]."
        )
    # Catches logits passed by mistake; exact normalisation is not enforced
    # because low-precision probabilities rarely sum to exactly one.
    if bool(((probs < 0) | (probs > 1)).any()) or bool(probs.isnan().any()):
        raise ValueError(
            "probs must contain probabilities in [0, 1] (did you pass logits?), got "
            f"values in [{float(probs.min())}, {float(probs.max())}]."
        )


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, "
            f"got shape {tuple(b.shape)}."
        )


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")


def _log_prob_of_targets(probs: Tensor, targets: Tensor) -> Tensor:
    """``log probs[i, targets[i]]`` with probabilities clamped away from zero, ``(N,)``."""
    picked = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    # Clamping keeps a single confidently wrong prediction from turning the
    # mean into +inf.
    return picked.clamp_min(torch.finfo(probs.dtype).tiny).log()


class _RunningMean:
    """Accumulates a sum and a count as tensors on the device of the inputs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    def _accumulate(self, batch_sum: Tensor, batch_count: Tensor) -> None:
        if self._sum is None or self._count is None:
            self._sum, self._count = batch_sum, batch_count
        else:
            self._sum = self._sum + batch_sum.to(self._sum.device)
            self._count = self._count + batch_count.to(self._count.device)

    def compute(self) -> Tensor:
        """Mean over everything seen since the last :meth:`reset`, a 0-d tensor.

        Raises
        ------
        RuntimeError
            If nothing (or only ignored targets) has been seen.
        """
        if self._sum is None or self._count is None or int(self._count) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute() called before any (non-ignored) "
                "targets were passed to update()."
            )
        return self._sum / self._count

    def to(self, device: torch.device | str) -> _RunningMean:
        """Move the accumulated state to ``device`` and return ``self``."""
        if self._sum is not None and self._count is not None:
            self._sum, self._count = self._sum.to(device), self._count.to(device)
        return self


class RunningNLLMetric(_RunningMean):
    """Running mean negative log-likelihood of class probabilities.

    Duck-typed stand-in for a torchmetrics ``Metric`` (``update``, ``compute``,
    ``reset``); the default grid-search loss for classification.

    Parameters
    ----------
    ignore_index : int, default=-100
        Targets equal to this value are skipped (e.g. padding tokens).
    """

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        super().__init__()

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        probs : Tensor
            Class probabilities, shape ``(batch, n_classes)`` (or ``(..., n_classes)``).
        targets : Tensor
            Integer class indices, shape ``(batch,)`` (or ``(...)``), possibly
            containing ``ignore_index``.
        """
        if probs.ndim < 1 or targets.shape != probs.shape[:-1]:
            raise ValueError(
                "targets must have shape probs.shape[:-1] = "
                f"{tuple(probs.shape[:-1])}, got shape {tuple(targets.shape)}."
            )
        _check_targets_dtype(targets)
        probs = probs.reshape(-1, probs.shape[-1])
        targets = targets.reshape(-1)
        keep = targets != self.ignore_index
        # Ignored positions are pointed at class 0 so gather stays in range;
        # they are masked out of the sum afterwards.
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
        log_p = _log_prob_of_targets(probs, safe_targets)
        batch_sum = -(log_p * keep.to(log_p.dtype)).sum()
        self._accumulate(batch_sum, keep.sum())


class RunningMSEMetric(_RunningMean):
    """Running mean squared error over all elements seen.

    Duck-typed stand-in for torchmetrics' ``MeanSquaredError``; the default
    grid-search loss for regression.
    """

    def update(self, preds: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        preds : Tensor
            Predictions, shape ``(batch, ...)``.
        targets : Tensor
            Targets, same shape as ``preds``.
        """
        _check_same_shape("preds", preds, "targets", targets)
        sq_err = (preds - targets).square()
        count = torch.tensor(sq_err.numel(), device=sq_err.device)
        self._accumulate(sq_err.sum(), count)


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose arg-max class equals the target.

    Parameters
    ----------
    probs : Tensor
        Class probabilities, shape ``(N, n_classes)``.
    targets : Tensor
        Integer class indices, shape ``(N,)``.
    """
    _check_classification(probs, targets)
    return float((probs.argmax(dim=-1) == targets).to(probs.dtype).mean())


def nll(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log-likelihood ``-mean_i log probs[i, targets[i]]``.

    Shapes as in :func:`accuracy`. Probabilities are clamped at the smallest
    positive normal number of their dtype, so the result is always finite.
    """
    _check_classification(probs, targets)
    return float(-_log_prob_of_targets(probs, targets).mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over samples of ``sum_c (probs[i, c] - onehot(targets[i])_c)^2``.

    Shapes as in :func:`accuracy`; ranges over ``[0, 2]``.
    """
    _check_classification(probs, targets)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).square().sum(dim=-1).mean())


def _bin_statistics(
    probs: Tensor, targets: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-bin sums for equal-width confidence bins on the maximum probability.

    Bin ``b`` holds confidences in ``(edges[b], edges[b+1]]``; bin 0 also holds 0.

    Returns
    -------
    edges : Tensor
        ``(n_bins + 1,)``.
    correct_sum, confidence_sum : Tensor
        ``(n_bins,)`` in the dtype of ``probs``.
    count : Tensor
        ``(n_bins,)``, int64.
    """
    _check_classification(probs, targets)
    _check_n_bins(n_bins)
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == targets).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, device=probs.device, dtype=probs.dtype)
    bin_index = torch.bucketize(confidence, edges[1:-1]).clamp_max(n_bins - 1)
    zeros = torch.zeros(n_bins, device=probs.device, dtype=probs.dtype)
    correct_sum = zeros.index_add(0, bin_index, correct)
    confidence_sum = zeros.index_add(0, bin_index, confidence)
    count = torch.bincount(bin_index, minlength=n_bins)
    return edges, correct_sum, confidence_sum, count


def _calibration_gaps(
    probs: Tensor, targets: Tensor, n_bins: int
) -> tuple[Tensor, Tensor]:
    """``|accuracy - confidence|`` per bin (0 where empty) and bin counts, ``(n_bins,)``."""
    _, correct_sum, confidence_sum, count = _bin_statistics(probs, targets, n_bins)
    denom = count.clamp_min(1).to(probs.dtype)
    return (correct_sum - confidence_sum).abs() / denom, count


def expected_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    Equal-width bins on ``[0, 1]`` over the maximum probability (confidence).

    Parameters
    ----------
    probs : Tensor
        Class probabilities, shape ``(N, n_classes)``.
    targets : Tensor
        Integer class indices, shape ``(N,)``.
    n_bins : int, default=15
        Number of confidence bins.
    """
    gaps, count = _calibration_gaps(probs, targets, n_bins)
    return float((gaps * count.to(gaps.dtype)).sum() / probs.shape[0])


def maximum_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins.

    Arguments as in :func:`expected_calibration_error`.
    """
    gaps, count = _calibration_gaps(probs, targets, n_bins)
    return float(gaps[count > 0].max())


ece = expected_calibration_error
mce = maximum_calibration_error


def reliability_diagram_data(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> dict[str, Tensor]:
    """Per-bin statistics for a reliability diagram.

    Arguments as in :func:`expected_calibration_error`.

    Returns
    -------
    dict
        ``"bin_edges"`` ``(n_bins + 1,)``; ``"accuracy"`` and ``"confidence"``
        ``(n_bins,)``, the mean correctness and mean confidence per bin (NaN for
        empty bins); ``"count"`` ``(n_bins,)`` int64 number of samples per bin.
    """
    edges, correct_sum, confidence_sum, count = _bin_statistics(probs, targets, n_bins)
    denom = count.to(probs.dtype)
    # 0/0 gives NaN for empty bins, which is the honest "no data" marker.
    return {
        "bin_edges": edges,
        "accuracy": correct_sum / denom,
        "confidence": confidence_sum / denom,
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

    Equals ``P(s_in > s_out) + P(s_in == s_out) / 2`` over all pairs
    (Mann-Whitney U statistic), computed exactly with integer pair counts.

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
    _, group = torch.unique(all_scores, sorted=True, return_inverse=True)
    n_in, n_out = scores_in.shape[0], scores_out.shape[0]
    n_groups = int(group.max()) + 1
    in_per_value = torch.bincount(group[:n_in], minlength=n_groups)
    out_per_value = torch.bincount(group[n_in:], minlength=n_groups)
    out_strictly_below = torch.cumsum(out_per_value, 0) - out_per_value
    wins = int((in_per_value * out_strictly_below).sum())
    ties = int((in_per_value * out_per_value).sum())
    return (2 * wins + ties) / (2 * n_in * n_out)


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> float:
    """Mean Gaussian negative log-likelihood of ``targets`` under ``N(mean, var)``.

    Averages ``0.5 log(2 pi var) + (y - mean)^2 / (2 var)`` over all elements.

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
    _check_same_shape("mean", mean, "var", var)
    _check_same_shape("mean", mean, "targets", targets)
    if mean.numel() == 0:
        raise ValueError(f"mean must be non-empty, got shape {tuple(mean.shape)}.")
    if not bool((var > 0).all()):
        raise ValueError(
            f"var must be strictly positive, got minimum value {float(var.min())}."
        )
    per_element = 0.5 * (math.log(2 * math.pi) + var.log()) + (
        targets - mean
    ).square() / (2 * var)
    return float(per_element.mean())
