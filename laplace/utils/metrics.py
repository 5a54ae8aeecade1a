"""Evaluation metrics for predictive distributions, on top of torchmetrics.

From torchmetrics, where it has the metric:

* :func:`accuracy` (``multiclass_accuracy``), :func:`expected_calibration_error`
  and :func:`maximum_calibration_error` (``multiclass_calibration_error`` with
  the ``'l1'`` / ``'max'`` norm), :func:`ood_auroc` (``binary_auroc``);
* :class:`RunningMSEMetric` is a torchmetrics ``MeanSquaredError`` (the default
  grid-search loss for regression, as in laplace-torch).

Ours, where torchmetrics has no equivalent:

* :class:`RunningNLLMetric`, a torchmetrics ``Metric`` for the negative
  log-likelihood of class *probabilities* with an ``ignore_index`` (the default
  grid-search loss for classification, as in laplace-torch);
* :func:`nll`, :func:`brier_score`, :func:`reliability_diagram_data` and
  :func:`gaussian_nll`.

The functional metrics validate their inputs (clear ``ValueError`` before any
work) and return Python floats. The running metrics keep their states on the
metric's device, created (as in torchmetrics) in torch's default dtype and
promoted by wider inputs: with a float32 default, float64 inputs accumulate in
float64 and half-precision inputs in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MeanSquaredError, Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

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
    # Catches logits passed by mistake (torchmetrics would silently apply a
    # softmax to them); exact normalisation is not enforced because
    # low-precision probabilities rarely sum to exactly one.
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


def _accumulation_dtype(state: Tensor, values: Tensor) -> torch.dtype:
    return torch.promote_types(state.dtype, values.dtype)


class RunningNLLMetric(Metric):
    """Running mean negative log-likelihood of class probabilities.

    A torchmetrics ``Metric`` (``update``, ``compute``, ``reset``, ``forward``,
    distributed reduction by summing its states); the default grid-search loss
    for classification. torchmetrics has no NLL of probabilities with an ignore
    index, hence this class.

    Parameters
    ----------
    ignore_index : int, default=-100
        Targets equal to this value are skipped (e.g. padding tokens).
    **kwargs
        Passed on to ``torchmetrics.Metric`` (e.g. ``dist_sync_on_step``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    nll_sum: Tensor
    n_valid_labels: Tensor

    def __init__(self, ignore_index: int = -100, **kwargs) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}.")
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        # 0-d, so that adding a batch sum of a wider dtype promotes it.
        self.add_state("nll_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_valid_labels", default=torch.tensor(0), dist_reduce_fx="sum")

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
        dtype = _accumulation_dtype(self.nll_sum, probs)
        log_p = _log_prob_of_targets(probs, safe_targets).to(dtype)
        batch_sum = -(log_p * keep.to(dtype)).sum()
        self.nll_sum = self.nll_sum.to(dtype) + batch_sum.to(self.nll_sum.device)
        self.n_valid_labels = self.n_valid_labels + keep.sum().to(
            self.n_valid_labels.device
        )

    def compute(self) -> Tensor:
        """Mean NLL over all non-ignored targets seen since :meth:`reset`, 0-d.

        Raises
        ------
        RuntimeError
            If nothing (or only ignored targets) has been seen.
        """
        if int(self.n_valid_labels) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute() called before any (non-ignored) "
                "targets were passed to update()."
            )
        return self.nll_sum / self.n_valid_labels


class RunningMSEMetric(MeanSquaredError):
    """torchmetrics' ``MeanSquaredError`` over all elements seen.

    The default grid-search loss for regression. It differs from its parent only
    in accumulating in the promoted dtype of its state and its inputs (float64
    inputs keep float64 precision), in raising ``ValueError`` for
    mismatched shapes and in raising ``RuntimeError`` from :meth:`compute` before
    any :meth:`update` (the parent warns and returns NaN).
    """

    sum_squared_error: Tensor
    total: Tensor

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
        dtype = _accumulation_dtype(self.sum_squared_error, preds)
        batch_sum = (preds.to(dtype) - targets.to(dtype)).square().sum()
        self.sum_squared_error = self.sum_squared_error.to(dtype) + batch_sum.to(
            self.sum_squared_error.device
        )
        self.total = self.total + preds.numel()

    def compute(self) -> Tensor:
        """Mean squared error since :meth:`reset`, 0-d.

        Raises
        ------
        RuntimeError
            If nothing has been seen.
        """
        if int(self.total) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute() called before any targets were "
                "passed to update()."
            )
        return super().compute().reshape(())


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
    _check_classification(probs, targets)
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
    _check_classification(probs, targets)
    return float(-_log_prob_of_targets(probs, targets).mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over samples of ``sum_c (probs[i, c] - onehot(targets[i])_c)^2``.

    Shapes as in :func:`accuracy`; ranges over ``[0, 2]``.
    """
    _check_classification(probs, targets)
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).square().sum(dim=-1).mean())


def expected_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    torchmetrics' ``multiclass_calibration_error`` (``norm='l1'``): equal-width
    bins ``[lo, hi)`` on ``[0, 1]`` over the maximum probability (confidence),
    computed in float32.

    Parameters
    ----------
    probs : Tensor
        Class probabilities, shape ``(N, n_classes)``.
    targets : Tensor
        Integer class indices, shape ``(N,)``.
    n_bins : int, default=15
        Number of confidence bins.
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
    _check_classification(probs, targets)
    _check_n_bins(n_bins)
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
    _check_classification(probs, targets)
    _check_n_bins(n_bins)
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
    _check_same_shape("mean", mean, "var", var)
    _check_same_shape("mean", mean, "targets", targets)
    if mean.numel() == 0:
        raise ValueError(f"mean must be non-empty, got shape {tuple(mean.shape)}.")
    if not bool((var > 0).all()):
        raise ValueError(
            f"var must be strictly positive, got minimum value {float(var.min())}."
        )
    return float(F.gaussian_nll_loss(mean, targets, var, full=True, eps=0.0))
