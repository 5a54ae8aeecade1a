"""Batches and data loaders: splitting, sizing and moving to a device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

Batch = tuple[Any, torch.Tensor] | MutableMapping


def split_batch(
    batch: Any, dict_key_x: str = "input_ids", dict_key_y: str = "labels"
) -> tuple[torch.Tensor | MutableMapping, torch.Tensor]:
    """Return ``(X, y)`` of a batch that is either ``(X, y)`` or dict-like.

    Dict-like batches are passed whole to the model (as Hugging Face models expect)
    and the targets are ``batch[dict_key_y]``.
    """
    if isinstance(batch, MutableMapping):
        if dict_key_y not in batch:
            raise ValueError(
                f"Dict-like batch has no target key dict_key_y={dict_key_y!r}; "
                f"its keys are {list(batch.keys())}."
            )
        return batch, batch[dict_key_y]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        "Each batch must be a tuple (X, y) or a dict-like object holding "
        f"dict_key_x and dict_key_y; got {type(batch).__name__}."
    )


def batch_size(X: torch.Tensor | MutableMapping, dict_key_x: str = "input_ids") -> int:
    """Number of data points in ``X`` (a tensor or a dict-like batch)."""
    if isinstance(X, MutableMapping):
        if dict_key_x not in X:
            raise ValueError(
                f"Dict-like batch has no input key dict_key_x={dict_key_x!r}; "
                f"its keys are {list(X.keys())}."
            )
        return len(X[dict_key_x])
    return len(X)


def to_device(X: Any, device: torch.device) -> Any:
    """Move a tensor, or every tensor of a dict-like batch, to ``device``."""
    if isinstance(X, torch.Tensor):
        return X.to(device)
    if isinstance(X, MutableMapping):
        return type(X)(
            {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in X.items()
            }
        )
    return X


def dataset_size(loader: Iterable) -> int:
    """``len(loader.dataset)``, with a clear error if the loader has none."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            "train_loader must be a torch DataLoader (or have a `.dataset` with a "
            f"length); got {type(loader).__name__} without `.dataset`."
        )
    try:
        n = len(dataset)
    except TypeError as err:
        raise ValueError(
            "len(train_loader.dataset) must be defined: the number of data points "
            "sets the scale of the likelihood."
        ) from err
    if n == 0:
        raise ValueError("train_loader is empty: len(train_loader.dataset) == 0.")
    return n


def iterate_batches(loader: Iterable) -> Iterator[Any]:
    """Iterate over ``loader``'s batches.

    A plain in-order ``DataLoader`` over a ``TensorDataset`` (no shuffling, default
    collate, no worker processes) yields copies of consecutive slices of the
    tensors: the same batches as the loader itself, without indexing and stacking
    each example in Python (which dominates small fits).
    """
    tensors = _sliceable_tensors(loader)
    if tensors is None:
        yield from loader
        return
    size = loader.batch_size
    n = len(tensors[0])
    stop = n - n % size if loader.drop_last else n
    for start in range(0, stop, size):
        # copies, like the default collate: a model that changes its inputs in
        # place must not change the data set
        yield [t[start : start + size].clone() for t in tensors]


def _sliceable_tensors(loader: Iterable) -> tuple[torch.Tensor, ...] | None:
    if type(loader) is not DataLoader or type(loader.dataset) is not TensorDataset:
        return None
    plain = (
        loader.batch_size is not None
        and type(loader.sampler) is SequentialSampler
        and type(loader.batch_sampler) is BatchSampler
        and loader.collate_fn is default_collate
        and loader.num_workers == 0
        and not loader.pin_memory
    )
    return loader.dataset.tensors if plain else None
