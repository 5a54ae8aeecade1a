"""The validation score of a Laplace approximation: its predictions on held-out
data scored by a loss or a running metric (``validate``, used by the grid
search of ``optimize_prior_precision``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from laplace.utils.data import split_batch


def _is_running_metric(loss: Any) -> bool:
    return all(hasattr(loss, name) for name in ("update", "compute", "reset"))


@torch.no_grad()
def validate(
    laplace: Any,
    val_loader: Iterable,
    loss: Callable | Any,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    dict_key_y: str = "labels",
) -> float:
    """Score ``laplace`` on ``val_loader`` with ``loss`` (lower is better).

    ``loss`` is either a running metric with ``update``/``compute``/``reset``, such
    as any torchmetrics ``Metric`` (:class:`~laplace.utils.metrics.RunningNLLMetric`,
    ``torchmetrics.MeanSquaredError``, ``MulticlassCalibrationError``, ...),
    updated with the predicted probabilities ``(batch, n_classes)``
    (classification) or predictive means ``(batch, n_outputs)`` (regression) and
    the targets, on the metric's ``device`` if it has one (the metric itself is
    not moved; a metric that computes one value per output is averaged over
    them); or a callable applied once to all predictions:
    ``loss(probs, targets)`` for classification and
    ``loss(means, variances, targets)`` for regression.
    """
    running = _is_running_metric(loss)
    if running:
        loss.reset()
    means, variances, targets = [], [], []
    # reward models are scored as classifiers of their preference pairs (the
    # probabilities of fitting=True), as laplace-torch does
    from laplace.likelihoods import likelihood_model  # laplace.utils loads first

    pair_kwargs = likelihood_model(laplace.likelihood).scoring_kwargs()
    for batch in val_loader:
        X, y = split_batch(batch, dict_key_y)
        out = laplace(
            X,
            pred_type=pred_type,
            link_approx=link_approx,
            n_samples=n_samples,
            **pair_kwargs,
        )
        mean, var = out if isinstance(out, tuple) else (out, None)
        y = y.to(mean.device)  # the predictions are on the model's device
        if running:
            target = y.reshape(mean.shape) if var is not None else y
            device = getattr(loss, "device", None)
            if isinstance(device, torch.device):
                mean, target = mean.to(device), target.to(device)
            loss.update(mean, target)
        else:
            means.append(mean)
            variances.append(var)
            targets.append(y)
    if running:
        # e.g. MeanSquaredError(num_outputs=K) gives one value per output
        return float(torch.as_tensor(loss.compute()).float().mean())
    if not means:
        raise ValueError("val_loader is empty.")
    mean, target = torch.cat(means), torch.cat(targets)
    if variances[0] is None:
        return float(loss(mean, target))
    return float(loss(mean, torch.cat(variances), target.reshape(mean.shape)))
