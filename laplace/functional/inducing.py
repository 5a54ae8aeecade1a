"""Inducing locations of VaLLA: given, random training inputs or k-means
centres of the training inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import torch

from laplace.utils.data import batch_size, concatenate_rows, dataset_size
from laplace.utils.subsets import random_subset_indices, subset_loader

__all__ = [
    "check_inducing_classes",
    "check_inducing_locations",
    "inducing_jacobians",
    "kmeans",
    "resolve_inducing_locations",
]

_STRATEGIES = ("random", "kmeans")


def check_inducing_locations(locations: Any, num_inducing: Any) -> None:
    """Validate the constructor arguments (before any data is seen)."""
    if isinstance(locations, str):
        if locations not in _STRATEGIES:
            raise ValueError(
                f"Invalid inducing_locations={locations!r}; use a tensor, a dict-like "
                f"batch of inputs or one of {list(_STRATEGIES)}."
            )
        if (
            isinstance(num_inducing, bool)
            or not isinstance(num_inducing, int)
            or (num_inducing < 1)
        ):
            raise ValueError(
                f"inducing_locations={locations!r} needs num_inducing, a positive int;"
                f" got {num_inducing!r}."
            )
        return
    if not isinstance(locations, torch.Tensor | MutableMapping):
        raise ValueError(
            "inducing_locations must be a tensor, a dict-like batch of inputs, "
            f"'random' or 'kmeans'; got {type(locations).__name__}."
        )


def check_inducing_classes(classes: Any) -> None:
    if classes is not None and (
        not isinstance(classes, torch.Tensor)
        or classes.ndim != 1
        or classes.is_floating_point()
    ):
        raise ValueError(
            "inducing_classes must be None or a 1-d integer tensor with one output "
            f"index per inducing input; got {classes!r}."
        )


def inducing_jacobians(J: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Rows ``(k, P)`` of the inducing outputs from the Jacobians ``(M, O, P)`` of
    the inducing inputs: all outputs (``k = M * O``) or one per input."""
    if classes is None:
        return J.reshape(-1, J.shape[-1])
    n, n_out = J.shape[:2]
    if len(classes) != n or int(classes.min()) < 0 or int(classes.max()) >= n_out:
        raise ValueError(
            f"inducing_classes must hold {n} output indices in [0, {n_out}); got "
            f"{classes.tolist()}."
        )
    return J[torch.arange(n, device=J.device), classes.to(J.device)]


def resolve_inducing_locations(
    locations: Any,
    num_inducing: int | None,
    loader: Iterable,
    batches: Callable[[Iterable], Iterator[tuple[Any, torch.Tensor]]],
    seed: int,
    dict_key_x: str,
) -> Any:
    """The inducing inputs ``(M, ...)`` (or a dict-like batch of ``M`` rows).

    ``batches(loader)`` yields ``(X, y)`` on the model's device.
    """
    if not isinstance(locations, str):
        n = batch_size(locations, dict_key_x)
        if num_inducing is not None and num_inducing != n:
            raise ValueError(
                f"num_inducing={num_inducing} disagrees with the {n} given "
                "inducing locations."
            )
        return locations
    n_total = dataset_size(loader)
    if locations == "random":
        indices = random_subset_indices(n_total, num_inducing, seed)
        return concatenate_rows(X for X, _ in batches(subset_loader(loader, indices)))
    inputs = concatenate_rows(
        X for X, _ in batches(subset_loader(loader, range(n_total)))
    )
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ValueError(
            "inducing_locations='kmeans' needs floating-point tensor inputs; use "
            "'random' or pass the locations."
        )
    if num_inducing > n_total:
        raise ValueError(
            f"num_inducing={num_inducing} exceeds the number of training points "
            f"{n_total}."
        )
    centres = kmeans(inputs.reshape(n_total, -1), num_inducing, seed)
    return centres.reshape(num_inducing, *inputs.shape[1:])


def kmeans(
    points: torch.Tensor, k: int, seed: int = 0, n_iter: int = 100
) -> torch.Tensor:
    """Lloyd's k-means of ``points`` ``(N, D)`` from ``k`` random distinct points
    (drawn with ``seed``); returns the centres ``(k, D)``."""
    start = random_subset_indices(len(points), k, seed).to(points.device)
    centres = points[start].clone()
    assignment = None
    for _ in range(n_iter):
        new = torch.cdist(points, centres).argmin(dim=1)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        counts = torch.bincount(assignment, minlength=k).to(points.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        filled = counts > 0
        # an emptied cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres
