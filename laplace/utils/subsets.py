"""Subsets of the training data: uniform and class-balanced index draws, a
sampler over a fixed subset (subset-of-data GP inference, Nystrom features,
inducing points), the indices a loader can yield and a loader over a subset."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
)

__all__ = [
    "SoDSampler",
    "balanced_indices",
    "random_subset_indices",
    "sod_indices",
    "subset_loader",
    "training_indices",
]


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


def training_indices(loader: DataLoader) -> torch.Tensor:
    """The indices of ``loader.dataset`` that ``loader`` can yield (through its
    sampler and batch sampler), sorted, ``(n,)`` int64. A random sampler's
    generator and the global RNG are left as they were."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    if dataset is None or sampler is None:
        raise ValueError(
            f"training_indices needs a DataLoader with a dataset; got "
            f"{type(loader).__name__}."
        )
    batches = getattr(loader, "batch_sampler", None)
    if batches is not None and type(batches) is not BatchSampler:
        return _sorted_indices(_replay(batches))  # a custom batch sampler
    n = len(dataset)
    if isinstance(sampler, SequentialSampler):
        if batches is not None and batches.drop_last:
            n -= n % batches.batch_size  # the last, incomplete batch never comes
        return torch.arange(n)
    if isinstance(sampler, RandomSampler):
        return torch.arange(n)  # every index can be drawn
    if isinstance(sampler, SubsetRandomSampler):
        return _sorted_indices(list(sampler.indices))
    return _sorted_indices(_replay(sampler))


def _sorted_indices(indices: list[Any]) -> torch.Tensor:
    values = [
        int(i) if isinstance(i, torch.Tensor) and i.numel() == 1 else i for i in indices
    ]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in values):
        raise ValueError(
            "training_indices needs a map-style dataset whose sampler yields "
            "integer indices."
        )
    return torch.tensor(sorted(set(values)), dtype=torch.long)


def _replay(source: Iterable) -> list[Any]:
    """Every index ``source`` (a sampler or batch sampler) yields, with the global
    RNG and any generator it holds restored afterwards."""
    generators = [g for g in _generators(source) if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):
            seen = []
            for item in source:
                seen.extend(item if isinstance(item, list | tuple) else [item])
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
    return seen


def _generators(source: Any) -> list[Any]:
    found = [getattr(source, "generator", None)]
    inner = getattr(source, "sampler", None)  # a batch sampler's sampler
    if inner is not None:
        found.append(getattr(inner, "generator", None))
    return found


def subset_loader(
    loader: DataLoader, indices: torch.Tensor | Sequence[int]
) -> DataLoader:
    """A sequential loader over the rows ``indices`` of ``loader.dataset``, in
    that order, with the batch size and collate function of ``loader``."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            f"A subset of the data needs a DataLoader with a dataset; got "
            f"{type(loader).__name__}."
        )
    indices = [int(i) for i in indices]
    return DataLoader(
        Subset(dataset, indices),
        batch_size=getattr(loader, "batch_size", None) or 1,
        shuffle=False,
        collate_fn=getattr(loader, "collate_fn", None),
    )
