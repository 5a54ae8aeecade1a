"""laplace.utils.functional_utils keeps laplace-torch 0.3's names, signatures and
meaning (issue 13.13); each helper against hand-computed expectations."""

import inspect
import math
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from laplace.utils import UnknownKeyError
from laplace.utils import functional_utils as fu

SIGNATURES = {
    "preserve_model_gradients": ["fit"],
    "same_configuration": ["left", "right"],
    "draw_gaussian": ["mean", "covariance", "n_samples", "generator"],
    "to_device": ["value", "device", "dtype"],
    "split_batch": ["batch", "dict_key_y"],
    "regression_targets": ["targets", "outputs"],
    "classification_targets": ["targets"],
    "training_indices": ["loader"],
    "subset_loader": ["loader", "indices"],
    "batch_size": ["inputs", "dict_key_x"],
    "concatenate_rows": ["chunks"],
    "select_rows": ["inputs", "indices", "batch_size"],
}


@pytest.mark.parametrize("name,params", SIGNATURES.items())
def test_signatures(name, params):
    assert list(inspect.signature(getattr(fu, name)).parameters) == params
    assert name in fu.__all__


# ---- preserve_model_gradients, same_configuration ----------------------------------
class _Owner:
    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))

    @fu.preserve_model_gradients
    def clobber(self, fail=False):
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model(torch.randn(3, 2)).sum().backward()
        if fail:
            raise RuntimeError("boom")
        return 7


@pytest.mark.parametrize("fail", [False, True])
def test_preserve_model_gradients_restores_grads_on_return_and_raise(fail):
    owner = _Owner()
    params = list(owner.model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 2.0)
    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            owner.clobber(fail=True)
    else:
        assert owner.clobber() == 7
    assert params[0].grad is None and not params[0].requires_grad
    assert all(p.grad is None for p in params[1:-1])
    assert torch.equal(params[-1].grad, torch.full_like(params[-1], 2.0))


def test_same_configuration():
    a = {"x": torch.tensor([1.0, 2.0]), "k": "v", "n": [1, (2, 3)]}
    same = {"x": torch.tensor([1.0, 2.0]), "k": "v", "n": [1, (2, 3)]}
    assert fu.same_configuration(left=a, right=same)
    assert not fu.same_configuration(a, {**a, "x": torch.tensor([1.0, 2.5])})
    assert not fu.same_configuration(a, {**a, "x": torch.tensor([[1.0, 2.0]])})
    assert not fu.same_configuration(a, {**a, "k": "w"})
    assert not fu.same_configuration(a, {k: v for k, v in a.items() if k != "n"})
    assert not fu.same_configuration(a, {**a, "n": [1, (2, 4)]})
    assert not fu.same_configuration(torch.tensor(1.0), 1.0)


# ---- draw_gaussian -------------------------------------------------------------------
N_MC = 40_000


def _mc_tolerance(cov):
    # 5 standard errors of a sample covariance entry: sd(S_ij) <=
    # sqrt((S_ii S_jj + S_ij^2) / n) <= sqrt(2 / n) * max variance
    return 5 * math.sqrt(2 / N_MC) * float(cov.diagonal(dim1=-2, dim2=-1).max())


def _covariances():
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 3, generator=gen)
    low = torch.randn(3, 1, generator=gen)
    # row 0 full rank, row 1 rank 1 (Cholesky fails)
    return torch.stack([full @ full.T + 0.1 * torch.eye(3), low @ low.T])


def test_draw_gaussian_per_row():
    cov = _covariances()
    mean = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    s = fu.draw_gaussian(mean, cov, N_MC, torch.Generator().manual_seed(1))
    assert s.shape == (N_MC, 2, 3) and s.dtype == mean.dtype
    for b in range(2):
        tol = _mc_tolerance(cov[b])
        torch.testing.assert_close(s[:, b].mean(0), mean[b], rtol=0, atol=tol)
        torch.testing.assert_close(torch.cov(s[:, b].T), cov[b], rtol=0, atol=tol)
    # rank-deficient row: draws stay in the range of its covariance
    null = torch.linalg.eigh(cov[1])[1][:, :2]
    assert ((s[:, 1] - mean[1]) @ null).abs().max() < 1e-10


def test_draw_gaussian_joint():
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(4, 2, generator=gen)
    cov = B @ B.T  # [B*C, B*C] of rank 2
    mean = torch.arange(4.0)
    s = fu.draw_gaussian(mean, cov, N_MC, torch.Generator().manual_seed(1))
    assert s.shape == (N_MC, 4)
    tol = _mc_tolerance(cov)
    torch.testing.assert_close(s.mean(0), mean, rtol=0, atol=tol)
    torch.testing.assert_close(torch.cov(s.T), cov, rtol=0, atol=tol)
    null = torch.linalg.eigh(cov)[1][:, :2]
    assert ((s - mean) @ null).abs().max() < 1e-10
    zero = fu.draw_gaussian(mean, torch.zeros(4, 4), 3)  # rank 0
    assert torch.equal(zero, mean.expand(3, 4))


def test_draw_gaussian_variances_dtype_and_reproducibility():
    mean = torch.zeros(2, 3, dtype=torch.float32)
    var = torch.tensor([[1.0, 4.0, 0.0], [0.25, 1.0, 9.0]], dtype=torch.float32)
    s = fu.draw_gaussian(mean, var, N_MC, torch.Generator().manual_seed(0))
    assert s.shape == (N_MC, 2, 3) and s.dtype == torch.float32
    torch.testing.assert_close(s.var(0), var, rtol=0.05, atol=1e-6)
    cov = _covariances()
    mean = torch.zeros(2, 3)
    a = fu.draw_gaussian(mean, cov, 5, torch.Generator().manual_seed(3))
    b = fu.draw_gaussian(mean, cov, 5, torch.Generator().manual_seed(3))
    c = fu.draw_gaussian(mean, cov, 5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert fu.draw_gaussian(mean, cov, 0).shape == (0, 2, 3)


@pytest.mark.parametrize(
    "mean,cov",
    [
        (torch.zeros(4), torch.zeros(3, 3)),
        (torch.zeros(2, 3), torch.zeros(2, 3, 2)),
        (torch.zeros(2, 3), torch.zeros(6, 6)),
        (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 3)),
    ],
)
def test_draw_gaussian_rejects_shapes(mean, cov):
    with pytest.raises(ValueError, match="draw_gaussian needs"):
        fu.draw_gaussian(mean, cov, 2)


# ---- batches ----------------------------------------------------------------------
def test_to_device_nested_keeps_integer_dtypes():
    Pair = namedtuple("Pair", "a b")
    value = {
        "x": torch.ones(2, dtype=torch.float64),
        "ids": torch.arange(3),
        "nest": [torch.zeros(1, dtype=torch.float64), (torch.ones(1), "tag")],
        "pair": Pair(torch.ones(1, dtype=torch.float64), 4),
        "name": "q",
    }
    out = fu.to_device(value, "meta", torch.float32)
    assert out["x"].device.type == "meta" and out["x"].dtype == torch.float32
    assert out["ids"].device.type == "meta" and out["ids"].dtype == torch.int64
    assert out["nest"][0].dtype == torch.float32 and out["nest"][1][1] == "tag"
    assert isinstance(out["nest"][1], tuple) and isinstance(out["pair"], Pair)
    assert out["pair"].a.dtype == torch.float32 and out["pair"].b == 4
    assert out["name"] == "q"
    same = fu.to_device(value, "cpu")
    assert same["x"].dtype == torch.float64


def test_split_batch_and_missing_key():
    X, y = torch.ones(2, 3), torch.tensor([0, 1])
    assert fu.split_batch((X, y))[0] is X
    batch = {"input_ids": X, "target": y}
    inputs, targets = fu.split_batch(batch, "target")  # dict_key_y positionally
    assert inputs is batch and targets is y
    with pytest.raises(UnknownKeyError) as info:
        fu.split_batch(batch)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("Dict-like batch has no target key")
    assert "dict_key_y='labels'" in str(info.value)
    assert fu.batch_size(batch) == 2 and fu.batch_size(X) == 2
    assert fu.batch_size({"ids": X[:1]}, "ids") == 1
    with pytest.raises(UnknownKeyError, match="dict_key_x='input_ids'"):
        fu.batch_size({"ids": X})


def test_select_and_concatenate_rows_recursive():
    X = torch.arange(12.0).reshape(6, 2)
    position = torch.arange(4).reshape(1, 4)  # not batched: leading size 1
    inputs = {
        "input_ids": X,
        "extra": [X + 1, {"mask": X > 3, "scale": torch.tensor(2.0)}],
        "position_ids": position,
        "name": "q",
    }
    rows = fu.select_rows(inputs, torch.tensor([1, 2]), 6)
    assert torch.equal(rows["input_ids"], X[1:3])
    assert torch.equal(rows["extra"][0], X[1:3] + 1)
    assert torch.equal(rows["extra"][1]["mask"], X[1:3] > 3)
    assert rows["extra"][1]["scale"] is inputs["extra"][1]["scale"]
    assert rows["position_ids"] is position and rows["name"] == "q"
    chunks = [fu.select_rows(inputs, slice(s, s + 4), 6) for s in (0, 4)]
    back = fu.concatenate_rows(chunks)
    assert torch.equal(back["input_ids"], X)
    assert torch.equal(back["extra"][0], X + 1)
    assert torch.equal(back["extra"][1]["mask"], X > 3)
    assert back["position_ids"] is position and back["name"] == "q"
    assert float(back["extra"][1]["scale"]) == 2.0
    assert torch.equal(fu.concatenate_rows([X[:2], X[2:]]), X)
    assert torch.equal(fu.concatenate_rows([X, X]), torch.cat([X, X]))
    assert torch.equal(fu.select_rows(X, torch.tensor([4]), 6), X[4:5])
    assert fu.select_rows(X, slice(0, 2), 5) is X  # not batched at this size
    with pytest.raises(ValueError, match="at least one"):
        fu.concatenate_rows([])


# ---- targets -----------------------------------------------------------------------
def test_regression_targets():
    out = torch.zeros(5, 2)
    y = torch.randn(5, 2)
    assert fu.regression_targets(y, out) is y
    y1 = torch.randn(5)
    torch.testing.assert_close(
        fu.regression_targets(y1, torch.zeros(5, 1)), y1[:, None]
    )
    for bad, outputs in [
        (torch.randn(5), out),  # [B] only for one output
        (torch.randn(1, 2), out),  # would broadcast
        (torch.randn(5, 3), out),
        (torch.randn(5, 1), torch.zeros(5)),
        (torch.randn(5, 2, 1), out),
    ]:
        with pytest.raises(ValueError, match="do not match"):
            fu.regression_targets(bad, outputs)


def test_classification_targets():
    idx = torch.tensor([2, 0, 1])
    for targets in [
        idx,
        idx.int(),
        idx[:, None],
        idx.double(),
        torch.eye(3)[idx],
        torch.eye(3, dtype=torch.long)[idx],
    ]:
        out = fu.classification_targets(targets)
        assert out.dtype == torch.int64 and torch.equal(out, idx)
    for bad in [
        torch.tensor([[0.2, 0.8], [1.0, 0.0]]),  # soft labels
        torch.tensor([[1, 1], [0, 1]]),
        torch.tensor([0.5, 1.0]),
        torch.tensor([-1, 0]),
        torch.zeros(2, 2, 2),
    ]:
        with pytest.raises(ValueError, match="Classification targets"):
            fu.classification_targets(bad)


# ---- data subsets --------------------------------------------------------------------
def _dataset(n=10):
    return TensorDataset(torch.arange(float(n))[:, None], torch.arange(n))


class _GlobalRandomSampler(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randint(self.n, (3,)).tolist())

    def __len__(self):
        return 3


def test_training_indices_without_consuming_randomness():
    data = _dataset()
    assert torch.equal(
        fu.training_indices(DataLoader(data, batch_size=3)), torch.arange(10)
    )
    gen = torch.Generator().manual_seed(5)
    shuffled = DataLoader(data, batch_size=3, shuffle=True, generator=gen)
    state = gen.get_state()
    assert torch.equal(fu.training_indices(shuffled), torch.arange(10))
    assert torch.equal(gen.get_state(), state)
    sub_gen = torch.Generator().manual_seed(1)
    subset = DataLoader(
        data, batch_size=2, sampler=SubsetRandomSampler([7, 2, 5], generator=sub_gen)
    )
    state = sub_gen.get_state()
    assert fu.training_indices(subset).tolist() == [2, 5, 7]
    assert torch.equal(sub_gen.get_state(), state)
    custom = DataLoader(data, batch_size=2, sampler=[3, 3, 1])
    assert fu.training_indices(custom).tolist() == [1, 3]
    batched = DataLoader(data, batch_sampler=[[4, 0], [8]])
    assert fu.training_indices(batched).tolist() == [0, 4, 8]
    dropped = DataLoader(data, batch_size=4, drop_last=True)
    assert fu.training_indices(dropped).tolist() == list(range(8))
    rng = torch.get_rng_state()
    globally = DataLoader(data, sampler=_GlobalRandomSampler(10))
    assert set(fu.training_indices(globally).tolist()) <= set(range(10))
    assert torch.equal(torch.get_rng_state(), rng)
    over_subset = DataLoader(Subset(data, [9, 8, 7]), batch_size=2)
    assert fu.training_indices(over_subset).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="DataLoader"):
        fu.training_indices([(torch.ones(1), torch.ones(1))])
    # the loader still iterates as before
    assert len(list(shuffled)) == 4


def test_subset_loader():
    data = _dataset()
    loader = DataLoader(data, batch_size=2, shuffle=True)
    sub = fu.subset_loader(loader, torch.tensor([5, 0, 3]))
    assert isinstance(sub.sampler, SequentialSampler)
    assert isinstance(sub.batch_sampler, BatchSampler)
    ys = [b[1].tolist() for b in sub]
    assert ys == [[5, 0], [3]]  # in the given order, with the loader's batch size
    assert ys == [b[1].tolist() for b in sub]  # and again: not random
