"""Diagonal SWAG variances (Maddox et al., 2019): the spread of SGD iterates
taken with a large constant learning rate around the optimum."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy

import torch
from torch import nn

from laplace.utils.data import split_batch, to_device
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.utils import trainable_parameters

__all__ = ["fit_diagonal_swag_var"]


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def fit_diagonal_swag_var(
    model: nn.Module,
    train_loader: Iterable,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_snapshots_total: int = 40,
    snapshot_freq: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    min_var: float = 1e-30,
) -> torch.Tensor:
    """Marginal variances of the trainable parameters from SGD snapshots.

    A deep copy of ``model`` is trained in train mode with SGD (``lr``,
    ``momentum``, ``weight_decay``) for ``n_snapshots_total * snapshot_freq``
    epochs over ``train_loader``; after every ``snapshot_freq``-th epoch the
    parameters are recorded.  The user's model is left unchanged.

    Parameters
    ----------
    model : nn.Module
    train_loader : iterable of (X, y) batches
    criterion : callable
        ``criterion(model(X), y)`` -> scalar loss, e.g. ``nn.CrossEntropyLoss()``.
    n_snapshots_total, snapshot_freq : int
    lr, momentum, weight_decay : float
    min_var : float
        Lower bound of the returned variances (keeps them positive).

    Returns
    -------
    Tensor
        `(n_params,)` variances of the snapshots (``E[theta^2] - E[theta]^2``),
        in the order of the trainable parameters, on the model's device and
        dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
    _positive_int(n_snapshots_total, "n_snapshots_total")
    _positive_int(snapshot_freq, "snapshot_freq")
    for name, value in (
        ("lr", lr),
        ("momentum", momentum),
        ("weight_decay", weight_decay),
    ):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative; got {value!r}.")
    if not min_var >= 0:
        raise ValueError(f"min_var must be non-negative; got {min_var!r}.")
    swag_model = deepcopy(model).train()
    params = trainable_parameters(swag_model)
    if not params:
        raise ValueError("The model has no parameter with requires_grad=True.")
    device = params[0].device
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # Welford's running moments: no cancellation in E[theta^2] - E[theta]^2
    mean = torch.zeros_like(parameters_to_vector(params)).detach()
    sq_dev = torch.zeros_like(mean)
    for epoch in range(n_snapshots_total * snapshot_freq):
        n_batches = 0
        for batch in train_loader:
            X, y = split_batch(batch)
            optimizer.zero_grad()
            loss = criterion(swag_model(to_device(X, device)), y.to(device))
            loss.backward()
            optimizer.step()
            n_batches += 1
        if n_batches == 0:
            raise ValueError("train_loader yielded no batches.")
        if (epoch + 1) % snapshot_freq == 0:
            n_seen = (epoch + 1) // snapshot_freq
            theta = parameters_to_vector(params).detach()
            delta = theta - mean
            mean += delta / n_seen
            sq_dev += delta * (theta - mean)
    return (sq_dev / n_snapshots_total).clamp_min(min_var)
