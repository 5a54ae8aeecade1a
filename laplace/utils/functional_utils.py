"""laplace-torch 0.3's ``laplace.utils.functional_utils``: helpers for batches,
targets, data subsets, Gaussian draws and keeping the user's model untouched,
with the same names, signatures and meaning.

``to_device``, ``split_batch`` and ``batch_size`` live in
:mod:`laplace.utils.data` and are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
)

from laplace.utils.data import batch_size, split_batch, to_device
from laplace.utils.subsets import SoDSampler

__all__ = [
    "SoDSampler",
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


def preserve_model_gradients(fit: F) -> F:
    """Decorate a method of an object with a ``model`` so that the ``.grad``
    (``None`` included) and ``requires_grad`` of every model parameter are as
    before the call, on return and on raise, whatever autograd work the method
    does (a user may call it between ``backward`` and ``optimizer.step``)."""

    @functools.wraps(fit)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = list(self.model.parameters())
        # clones: backward() accumulates into an existing .grad in place
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            return fit(self, *args, **kwargs)
        finally:
            for p, grad, flag in zip(params, grads, flags):
                p.requires_grad_(flag)
                p.grad = grad

    return wrapper  # type: ignore[return-value]


def same_configuration(left: Any, right: Any) -> bool:
    """Whether two configurations (nested mappings and sequences of numbers,
    strings and tensors) are equal; tensors must agree in shape and values."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        if not (isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor)):
            return False
        return left.shape == right.shape and bool(
            torch.equal(left.detach().cpu(), right.detach().cpu())
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(
            same_configuration(left[k], right[k]) for k in left
        )
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            same_configuration(a, b) for a, b in zip(left, right)
        )
    return left == right


def draw_gaussian(
    mean: torch.Tensor,
    covariance: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples of Gaussians with (possibly singular) covariances.

    Parameters
    ----------
    mean : Tensor
        ``[B, C]`` (one Gaussian per row) or ``[B*C]`` (one joint Gaussian).
    covariance : Tensor
        ``[B, C, C]`` for a ``[B, C]`` mean (or ``[B, C]`` variances), or
        ``[B*C, B*C]`` for a ``[B*C]`` mean. Rank-deficient is fine: the square
        root comes from an eigendecomposition, not Cholesky, and samples stay in
        the range of the covariance.
    n_samples : int
    generator : torch.Generator, optional

    Returns
    -------
    Tensor
        ``[n_samples, B, C]`` or ``[n_samples, B*C]``, in ``mean``'s dtype.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
        raise ValueError(f"n_samples must be a non-negative int; got {n_samples!r}.")
    shape = tuple(mean.shape)
    if covariance.shape == mean.shape:  # variances
        eps = _standard_normal((n_samples, *shape), mean, generator)
        return mean + covariance.clamp_min(0).sqrt() * eps
    d = shape[-1] if mean.ndim else 0
    if mean.ndim not in (1, 2) or covariance.shape != (*shape, d):
        raise ValueError(
            "draw_gaussian needs mean [B, C] with covariance [B, C, C] (or [B, C] "
            "variances), or mean [B*C] with covariance [B*C, B*C]; got mean "
            f"{shape} and covariance {tuple(covariance.shape)}."
        )
    scale = _psd_root(covariance)  # (..., d, d) with scale @ scale.mT = cov
    eps = _standard_normal((n_samples, *shape), mean, generator)
    return mean + (scale @ eps.unsqueeze(-1)).squeeze(-1)


def _standard_normal(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    return torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)


def _psd_root(covariance: torch.Tensor) -> torch.Tensor:
    """``S`` with ``S S^T = covariance`` for (batches of) PSD matrices; eigenvalues
    at round-off level are zeroed so draws stay in the covariance's range."""
    work = covariance if covariance.dtype in (torch.float32, torch.float64) else None
    work = covariance.float() if work is None else work  # eigh needs float32/64
    evals, evecs = torch.linalg.eigh(0.5 * (work + work.mT))
    tol = evals.abs().amax(-1, keepdim=True) * evals.shape[-1]
    tol = tol * torch.finfo(evals.dtype).eps
    root = evecs * torch.where(evals > tol, evals, 0.0).sqrt().unsqueeze(-2)
    return root.to(covariance.dtype)


def regression_targets(targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``targets`` shaped like ``outputs`` without broadcasting: equal shapes, or
    ``[B]`` targets for ``[B, 1]`` outputs (one output); else ``ValueError``."""
    if targets.shape == outputs.shape:
        return targets
    if outputs.ndim >= 1 and outputs.shape[-1] == 1:
        if targets.shape == outputs.shape[:-1]:
            return targets.unsqueeze(-1)
    raise ValueError(
        f"Regression targets of shape {tuple(targets.shape)} do not match the "
        f"model outputs of shape {tuple(outputs.shape)} (only [B] targets for "
        "[B, 1] outputs are reshaped; nothing is broadcast)."
    )


def classification_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class indices ``[B]`` (int64) from ``[B]`` or ``[B, 1]`` indices or
    one-hot ``[B, C]`` rows; ``ValueError`` for anything else."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            f"Classification targets must be a tensor; got {type(targets).__name__}."
        )
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim == 2:
        one_hot = ((targets == 0) | (targets == 1)).all() and bool(
            (targets.sum(-1) == 1).all()
        )
        if not one_hot:
            raise ValueError(
                f"Classification targets of shape {tuple(targets.shape)} must be "
                "one-hot rows (a single 1 per row, zeros elsewhere)."
            )
        return targets.argmax(-1)
    if targets.ndim != 1 or targets.is_complex():
        raise ValueError(
            "Classification targets must be [B] or [B, 1] class indices or one-hot "
            f"[B, C]; got shape {tuple(targets.shape)} and dtype {targets.dtype}."
        )
    if targets.is_floating_point() and not bool((targets == targets.round()).all()):
        raise ValueError("Classification targets must be whole numbers (classes).")
    if len(targets) and bool((targets < 0).any()):
        raise ValueError(
            f"Classification targets must be non-negative; got {int(targets.min())}."
        )
    return targets.long()


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


def concatenate_rows(chunks: Iterable[Any]) -> Any:
    """Concatenate batches along the rows: tensors with ``torch.cat``, mappings
    and sequences entry by entry (recursively). Inside mappings and sequences,
    an entry that is the very same object in every chunk (metadata
    :func:`select_rows` left untouched), a 0-d tensor or a non-tensor is taken
    once from the first chunk."""
    chunks = list(chunks)
    if not chunks:
        raise ValueError("concatenate_rows needs at least one batch.")
    return _concatenate(chunks, top=True)


def _concatenate(chunks: list[Any], top: bool = False) -> Any:
    first = chunks[0]
    if not top and all(c is first for c in chunks):
        return first
    if isinstance(first, torch.Tensor):
        return first if first.ndim == 0 else torch.cat(chunks, dim=0)
    if isinstance(first, Mapping):
        return type(first)({k: _concatenate([c[k] for c in chunks]) for k in first})
    if isinstance(first, list | tuple) and _holds_tensor(first):
        parts = [_concatenate([c[i] for c in chunks]) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    if top:
        raise ValueError(f"Cannot concatenate batches of type {type(first).__name__}.")
    return first


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_tensor(v) for v in value)
    return False


def select_rows(
    inputs: Any, indices: torch.Tensor | slice | Sequence[int], batch_size: int
) -> Any:
    """Rows ``indices`` (a slice or 1-d indices) of every tensor in ``inputs``
    whose leading size is ``batch_size``, recursively through mappings and
    sequences; everything else (non-batched metadata) is left untouched."""
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim and len(inputs) == batch_size:
            return inputs[indices]
        return inputs
    if isinstance(inputs, Mapping):
        return type(inputs)(
            {k: select_rows(v, indices, batch_size) for k, v in inputs.items()}
        )
    if isinstance(inputs, list | tuple) and _holds_tensor(inputs):
        parts = [select_rows(v, indices, batch_size) for v in inputs]
        return (
            type(inputs)(*parts) if hasattr(inputs, "_fields") else type(inputs)(parts)
        )
    return inputs
