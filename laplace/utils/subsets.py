"""Random subsets of the training data: uniform and class-balanced index draws,
and a sampler over a fixed subset (subset-of-data GP inference, Nystrom
features, inducing points)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["SoDSampler", "balanced_indices", "random_subset_indices", "sod_indices"]


def _check_sizes(n_data: int, n_subset: int) -> None:
    for name, value in (("n_data", n_data), ("n_subset", n_subset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if n_subset > n_data:
        raise ValueError(
            f"n_subset={n_subset} exceeds the number of training points {n_data}."
        )


def random_subset_indices(n_data: int, n_subset: int, seed: int = 0) -> torch.Tensor:
    """``n_subset`` distinct indices of ``range(n_data)`` drawn uniformly with
    ``seed`` (reproducible, independent of the global RNG), ``(n_subset,)``."""
    _check_sizes(n_data, n_subset)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_data, generator=generator)[:n_subset]


def sod_indices(n_data: int, n_subset: int, seed: int = 0) -> torch.Tensor:
    """The subset of data laplace-torch picks for the subset-of-data GP
    (``FunctionalLaplace``, ``SoDSampler``): ``n_subset`` distinct indices of
    ``range(n_data)``, ``numpy.random.default_rng(seed).choice(n_data, n_subset,
    replace=False)`` in that order, ``(n_subset,)`` int64."""
    _check_sizes(n_data, n_subset)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(n_data, n_subset, replace=False)).long()


def balanced_indices(targets: torch.Tensor, n_subset: int, seed: int) -> torch.Tensor:
    """``n_subset`` indices with (as far as the classes allow) the same number of
    points of every class in ``targets`` ``(N,)``, drawn with ``seed``."""
    if n_subset > len(targets):
        raise ValueError(
            f"n_subset={n_subset} exceeds the number of training points {len(targets)}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    classes = targets.unique()
    per_class = n_subset // len(classes)
    chosen = []
    for c in classes:
        members = (targets == c).nonzero().flatten().cpu()
        perm = torch.randperm(len(members), generator=generator)
        chosen.append(members[perm[:per_class]])
    chosen = torch.cat(chosen)
    rest = torch.ones(len(targets), dtype=torch.bool)
    rest[chosen] = False
    rest = rest.nonzero().flatten()
    fill = rest[
        torch.randperm(len(rest), generator=generator)[: n_subset - len(chosen)]
    ]
    return torch.cat([chosen, fill])


class SoDSampler(Sampler[int]):
    """Sampler over a fixed random subset of ``M`` of the ``N`` data points
    (subset of data, :func:`sod_indices`), the same subset in the same order on
    every pass.

    Parameters
    ----------
    N : int
        Data set size.
    M : int
        Subset size, ``M <= N``.
    seed : int, default=0
    """

    def __init__(self, N: int, M: int, seed: int = 0) -> None:
        self.indices = sod_indices(N, M, seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)
