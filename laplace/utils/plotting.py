"""Matplotlib helpers for calibration and 1-d regression plots.

matplotlib is an optional extra, so it is imported inside each function. The
helpers draw on (and return) an ``Axes`` and never call ``plt.show()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from laplace.utils.metrics import expected_calibration_error, reliability_diagram_data

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_reliability_diagram", "plot_regression_band"]

_DIAGONAL_GID = "laplace-perfect-calibration"


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "Plotting needs matplotlib; install it with `pip install laplace-ng[plot]`."
        ) from err
    return plt


def _to_numpy_1d(name: str, values: Tensor | np.ndarray) -> np.ndarray:
    """Flatten ``(n,)`` or ``(n, 1)`` data to a float64 numpy array ``(n,)``."""
    tensor = torch.as_tensor(values)
    if tensor.ndim > 2 or (tensor.ndim == 2 and tensor.shape[1] != 1):
        raise ValueError(
            f"{name} must have shape (n,) or (n, 1) for a 1-d plot, got shape "
            f"{tuple(tensor.shape)}."
        )
    # float64 on CPU also covers bfloat16/half and GPU tensors, which numpy rejects.
    return tensor.detach().to("cpu", torch.float64).reshape(-1).numpy()


def plot_reliability_diagram(
    probs: Tensor,
    targets: Tensor,
    n_bins: int = 15,
    ax: Axes | None = None,
    label: str | None = None,
) -> Axes:
    """Bar plot of per-bin accuracy against confidence, with the ECE in the legend.

    Draws one bar container (``n_bins`` bars; empty bins have height 0) and, once
    per ``Axes``, the dashed diagonal of perfect calibration, so several models
    can be overlaid by passing the same ``ax``.

    Parameters
    ----------
    probs, targets, n_bins
        As in :func:`~laplace.utils.metrics.expected_calibration_error`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure is created if omitted.
    label : str, optional
        Legend name of this model.

    Returns
    -------
    matplotlib.axes.Axes
    """
    plt = _pyplot()
    data = reliability_diagram_data(probs, targets, n_bins)
    ece_value = expected_calibration_error(probs, targets, n_bins)
    edges = data["bin_edges"].detach().to("cpu", torch.float64).numpy()
    acc = np.nan_to_num(data["accuracy"].detach().to("cpu", torch.float64).numpy())
    if ax is None:
        _, ax = plt.subplots()
    if not any(line.get_gid() == _DIAGONAL_GID for line in ax.get_lines()):
        ax.plot(
            [0, 1],
            [0, 1],
            "k--",
            linewidth=1,
            label="Perfect calibration",
            gid=_DIAGONAL_GID,
        )
    bar_label = (
        f"ECE = {ece_value:.3f}"
        if label is None
        else f"{label} (ECE = {ece_value:.3f})"
    )
    ax.bar(
        edges[:-1],
        acc,
        width=np.diff(edges),
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label=bar_label,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left")
    return ax


def plot_regression_band(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    mean: Tensor,
    std: Tensor,
    ax: Axes | None = None,
    n_std: float = 2,
    title: str | None = None,
) -> Axes:
    """Scatter the training data with the predictive mean and a ``± n_std`` band.

    Draws three artists: the data scatter, the mean line and the filled band.

    Parameters
    ----------
    x_train, y_train : Tensor
        Training inputs and targets, shape ``(N,)`` or ``(N, 1)``.
    x_test : Tensor
        Test inputs, shape ``(M,)`` or ``(M, 1)``; need not be sorted.
    mean, std : Tensor
        Predictive mean and standard deviation at ``x_test``, shape ``(M,)`` or
        ``(M, 1)``.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure is created if omitted.
    n_std : float, default=2
        Half-width of the band in standard deviations.
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.axes.Axes
    """
    plt = _pyplot()
    if not n_std > 0:
        raise ValueError(f"n_std must be positive, got {n_std!r}.")
    xs, ys = _to_numpy_1d("x_train", x_train), _to_numpy_1d("y_train", y_train)
    xt, mu, sd = (
        _to_numpy_1d("x_test", x_test),
        _to_numpy_1d("mean", mean),
        _to_numpy_1d("std", std),
    )
    if xs.shape != ys.shape:
        raise ValueError(
            f"y_train must have as many points as x_train ({xs.shape[0]}), got {ys.shape[0]}."
        )
    if not xt.shape == mu.shape == sd.shape:
        raise ValueError(
            f"mean and std must have as many points as x_test ({xt.shape[0]}), got "
            f"{mu.shape[0]} and {sd.shape[0]}."
        )
    if (sd < 0).any():
        raise ValueError(f"std must be non-negative, got minimum {sd.min()}.")
    # Lines and bands are drawn in x order, so unsorted test inputs are sorted.
    order = np.argsort(xt, kind="stable")
    xt, mu, sd = xt[order], mu[order], sd[order]
    if ax is None:
        _, ax = plt.subplots()
    ax.scatter(xs, ys, s=12, color="black", alpha=0.7, label="Data")
    (line,) = ax.plot(xt, mu, label="Predictive mean")
    ax.fill_between(
        xt,
        mu - n_std * sd,
        mu + n_std * sd,
        color=line.get_color(),
        alpha=0.25,
        label=f"± {n_std:g} std",
    )
    if title is not None:
        ax.set_title(title)
    ax.legend()
    return ax
