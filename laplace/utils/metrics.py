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
from torchmetrics import MeanSquaredError, Metric

from laplace.utils import metric_functions
from laplace.utils.metric_functions import *  # noqa: F403 (the functional metrics)
from laplace.utils.metric_functions import (
    check_same_shape,
    check_targets_dtype,
    log_prob_of_targets,
)

__all__ = ["RunningNLLMetric", "RunningMSEMetric", *metric_functions.__all__]


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
        check_targets_dtype(targets)
        probs = probs.reshape(-1, probs.shape[-1])
        targets = targets.reshape(-1)
        keep = targets != self.ignore_index
        # Ignored positions are pointed at class 0 so gather stays in range;
        # they are masked out of the sum afterwards.
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
        dtype = _accumulation_dtype(self.nll_sum, probs)
        log_p = log_prob_of_targets(probs, safe_targets).to(dtype)
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
        check_same_shape("preds", preds, "targets", targets)
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
