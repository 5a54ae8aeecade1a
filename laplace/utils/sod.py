"""The subset of data of the subset-of-data GP (``FunctionalLaplace``,
``SoDSampler``): the indices laplace-torch draws for a seed."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["sod_indices"]


def sod_indices(n_data: int, n_subset: int, seed: int = 0) -> torch.Tensor:
    """The subset of data laplace-torch picks: ``n_subset`` distinct indices of
    ``range(n_data)``, ``numpy.random.default_rng(seed).choice(n_data, n_subset,
    replace=False)`` in that order, ``(n_subset,)`` int64."""
    for name, value in (("n_data", n_data), ("n_subset", n_subset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if n_subset > n_data:
        raise ValueError(
            f"n_subset={n_subset} exceeds the number of training points {n_data}."
        )
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(n_data, n_subset, replace=False)).long()
