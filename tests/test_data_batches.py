"""``iterate_batches``: the slicing fast path yields exactly the loader's batches."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from laplace.utils.data import _sliceable_tensors, iterate_batches


def _tensors(dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(11, 2, 3, generator=gen).to(dtype)
    y = torch.randint(4, (11,), generator=gen)
    w = torch.rand(11, generator=gen, dtype=torch.float64)
    return X, y, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 4, 11, 32])
@pytest.mark.parametrize("drop_last", [False, True])
def test_fast_path_equals_dataloader(dtype, batch_size, drop_last):
    loader = DataLoader(
        TensorDataset(*_tensors(dtype)), batch_size=batch_size, drop_last=drop_last
    )
    assert _sliceable_tensors(loader) is not None
    expected = list(loader)
    found = list(iterate_batches(loader))
    assert len(found) == len(expected)
    for ours, theirs in zip(found, expected):
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)


def test_batches_are_copies():
    X, y, w = _tensors(torch.float32)
    original = X.clone()
    for batch in iterate_batches(DataLoader(TensorDataset(X, y, w), batch_size=4)):
        batch[0].mul_(0)  # a model that changes its input in place
    assert torch.equal(X, original)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shuffle": True},
        {"collate_fn": lambda items: items},
        {"batch_size": None},
        {"sampler": [3, 1, 2]},
    ],
)
def test_other_loaders_are_iterated_as_they_are(kwargs):
    X, y, _ = _tensors(torch.float32)
    kwargs = {"batch_size": 4, **kwargs}
    loader = DataLoader(TensorDataset(X, y), **kwargs)
    assert _sliceable_tensors(loader) is None
    torch.manual_seed(1)
    found = list(iterate_batches(loader))
    torch.manual_seed(1)
    expected = list(loader)
    assert len(found) == len(expected)
    for ours, theirs in zip(found, expected):
        assert str(ours) == str(theirs)


def test_plain_iterables_pass_through():
    X, y, _ = _tensors(torch.float32)
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    assert list(iterate_batches(batches)) == batches
