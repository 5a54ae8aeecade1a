"""Batches and data loaders: splitting, sizing, moving to a device, selecting
and concatenating rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from laplace.utils.errors import UnknownKeyError

Batch = tuple[Any, torch.Tensor] | MutableMapping


def split_batch(
    batch: Any, dict_key_y: str = "labels"
) -> tuple[torch.Tensor | MutableMapping, torch.Tensor]:
    """Return ``(inputs, targets)`` of a batch that is either ``(X, y)`` or
    dict-like.

    Dict-like batches are passed whole to the model as inputs (as Hugging Face
    models expect) and the targets are ``batch[dict_key_y]``.

    Raises
    ------
    UnknownKeyError
        A dict-like batch without ``dict_key_y`` (a ``KeyError`` and a
        ``ValueError``).
    """
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            raise UnknownKeyError(
                f"Dict-like batch has no target key dict_key_y={dict_key_y!r}; "
                f"its keys are {list(batch.keys())}."
            )
        return batch, batch[dict_key_y]
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        "Each batch must be a tuple (X, y) or a dict-like object holding "
        f"the inputs and dict_key_y={dict_key_y!r}; got {type(batch).__name__}."
    )


def batch_size(inputs: torch.Tensor | Mapping, dict_key_x: str = "input_ids") -> int:
    """Number of data points in ``inputs`` (a tensor, or a dict-like batch whose
    ``dict_key_x`` entry holds one row per data point)."""
    if isinstance(inputs, Mapping):
        if dict_key_x not in inputs:
            raise UnknownKeyError(
                f"Dict-like batch has no input key dict_key_x={dict_key_x!r}; "
                f"its keys are {list(inputs.keys())}."
            )
        return len(inputs[dict_key_x])
    return len(inputs)


def to_device(
    value: Any, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> Any:
    """Move every tensor in ``value`` (a tensor, or mappings, lists and tuples of
    them, nested) to ``device``; with ``dtype``, floating-point tensors are also
    cast to it (integer tensors such as token ids or labels keep theirs). Other
    entries are kept as they are."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    if isinstance(value, Mapping):
        return type(value)({k: to_device(v, device, dtype) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(to_device(v, device, dtype) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device, dtype) for v in value)
    return value


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
