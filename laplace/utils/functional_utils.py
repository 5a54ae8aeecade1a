"""Helpers of the function-space (GP) Laplace approximations: subsets of the
training data, rows of (dict-like) batches, targets, Gaussian draws and keeping
the user's model untouched."""

from __future__ import annotations

import functools
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from laplace.utils.data import batch_size, split_batch, to_device
from laplace.utils.sod import sod_indices

__all__ = [
    "SoDSampler",
    "balanced_indices",
    "batch_size",
    "classification_targets",
    "concatenate_rows",
    "draw_gaussian",
    "preserve_model_gradients",
    "regression_targets",
    "same_configuration",
    "select_rows",
    "split_batch",
    "subset_loader",
    "to_device",
    "training_indices",
]

F = TypeVar("F", bound=Callable[..., Any])
Rows = torch.Tensor | MutableMapping


def preserve_model_gradients(method: F) -> F:
    """Decorate a method of an object with a ``model`` so that the ``.grad`` and
    ``requires_grad`` of every model parameter are as before the call, whatever
    autograd work the method does (a user may call it between ``backward`` and
    ``optimizer.step``)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = list(self.model.parameters())
        # clones: backward() accumulates into an existing .grad in place
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            return method(self, *args, **kwargs)
        finally:
            for p, grad, flag in zip(params, grads, flags):
                p.requires_grad_(flag)
                p.grad = grad

    return wrapper  # type: ignore[return-value]


def same_configuration(saved: Any, current: Any) -> bool:
    """Whether two configurations (nested dicts/lists of numbers, strings and
    tensors) are equal; tensors must agree in shape and values."""
    if isinstance(saved, torch.Tensor) or isinstance(current, torch.Tensor):
        if not (isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor)):
            return False
        return saved.shape == current.shape and bool(
            torch.equal(saved.detach().cpu(), current.detach().cpu())
        )
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return saved.keys() == current.keys() and all(
            same_configuration(saved[k], current[k]) for k in saved
        )
    if isinstance(saved, list | tuple) and isinstance(current, list | tuple):
        return len(saved) == len(current) and all(
            same_configuration(a, b) for a, b in zip(saved, current)
        )
    return saved == current


def draw_gaussian(
    mean: torch.Tensor,
    cov: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples ``(n_samples, d)`` of N(mean ``(d,)``, cov ``(d, d)``).

    ``cov`` may be singular (joint predictives of classifiers, more outputs than
    parameters): the square root comes from an eigendecomposition, not Cholesky.
    """
    if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
        raise ValueError(
            f"draw_gaussian needs mean (d,) and cov (d, d); got {tuple(mean.shape)} "
            f"and {tuple(cov.shape)}."
        )
    evals, evecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    # eigenvalues at round-off level are zeros of a singular cov: drop them so
    # the draws stay in its range
    tol = evals.abs().max() * len(evals) * torch.finfo(evals.dtype).eps
    scale = evecs * torch.where(evals > tol, evals, 0.0).sqrt()
    eps = torch.randn(
        n_samples, len(mean), device=mean.device, dtype=mean.dtype, generator=generator
    )
    return mean + eps @ scale.T


def regression_targets(y: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """Regression targets as ``(batch, n_outputs)``; ``(batch,)`` means one output."""
    if y.ndim == 1 and n_outputs == 1:
        y = y.unsqueeze(-1)
    if y.ndim != 2 or y.shape[-1] != n_outputs or not y.is_floating_point():
        raise ValueError(
            f"Regression targets must be a float tensor of shape (batch, {n_outputs});"
            f" got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    return y


def classification_targets(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Check class-index targets ``(batch,)`` with values in ``[0, n_classes)``."""
    if y.is_floating_point() or y.ndim != 1:
        raise ValueError(
            "Classification targets must be a 1-d integer tensor of class indices; "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"Classification targets must lie in [0, {n_classes}); got values in "
            f"[{int(y.min())}, {int(y.max())}]."
        )
    return y


def training_indices(n_data: int, n_subset: int, seed: int = 0) -> torch.Tensor:
    """``n_subset`` distinct indices of ``range(n_data)`` drawn uniformly with
    ``seed`` (reproducible, independent of the global RNG), ``(n_subset,)``."""
    for name, value in (("n_data", n_data), ("n_subset", n_subset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if n_subset > n_data:
        raise ValueError(
            f"n_subset={n_subset} exceeds the number of training points {n_data}."
        )
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_data, generator=generator)[:n_subset]


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


def subset_loader(
    loader: DataLoader, indices: torch.Tensor | Sequence[int]
) -> DataLoader:
    """A loader over the rows ``indices`` of ``loader.dataset``, in that order, with
    the batch size and collate function of ``loader``."""
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


def concatenate_rows(chunks: Iterable[Rows]) -> Rows:
    """Concatenate batches (tensors, or dict-like batches whose tensors share the
    leading dimension) along the rows; non-tensor entries come from the first."""
    chunks = list(chunks)
    if not chunks:
        raise ValueError("concatenate_rows needs at least one batch.")
    first = chunks[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(chunks, dim=0)
    if isinstance(first, MutableMapping):
        return {
            k: torch.cat([c[k] for c in chunks], dim=0)
            if isinstance(v, torch.Tensor)
            else v
            for k, v in first.items()
        }
    raise ValueError(f"Cannot concatenate batches of type {type(first).__name__}.")


def select_rows(
    X: Rows, index: torch.Tensor | slice, dict_key_x: str = "input_ids"
) -> Rows:
    """Rows ``index`` of a tensor, or of every tensor of a dict-like batch whose
    leading size is the batch size ``len(X[dict_key_x])``."""
    if isinstance(X, torch.Tensor):
        return X[index]
    if isinstance(X, MutableMapping):
        n = batch_size(X, dict_key_x)
        return {
            k: v[index] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v
            for k, v in X.items()
        }
    raise ValueError(f"Cannot select rows of {type(X).__name__}.")
