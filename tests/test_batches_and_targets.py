"""Dict batches (issue 13.5) and validation targets in the grid search (issue
14.5): a missing ``dict_key_y`` is both a KeyError and a ValueError; the grid
search reads targets with ``la.dict_key_y`` and checks them exactly as ``fit``
checks training targets, before any prediction."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from laplace import Laplace
from laplace.likelihoods import likelihood_model
from laplace.utils import UnknownKeyError

KEYS = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "kron"),
    ("last_layer", "full"),
    ("subnetwork", "diag"),
]
LIKELIHOODS = ["classification", "regression"]


def body(n_out):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, n_out)).double()


class DictModel(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        self.body = body(n_out)

    def forward(self, batch):
        return self.body(batch["input_ids"])


class DictData(Dataset):
    def __init__(self, X, y, key="target"):
        self.X, self.y, self.key = X, y, key

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"input_ids": self.X[i], self.key: self.y[i]}


def data(likelihood, n=24, seed=0, n_out=3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        return X, torch.randint(n_out, (n,), generator=gen)
    return X, torch.randn(n, n_out, generator=gen, dtype=torch.float64)


def build(model, likelihood, key, **kwargs):
    if key[0] == "subnetwork":
        kwargs["subnetwork_indices"] = torch.tensor([0, 4, 9, 30, 37])
    return Laplace(model, likelihood, *key, **kwargs)


def test_unknown_key_error_is_key_and_value_error_with_plain_message():
    err = UnknownKeyError("no key 'x' here")
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    assert str(err) == "no key 'x' here"  # KeyError would show its repr


@pytest.mark.parametrize("key", KEYS)
def test_missing_dict_key_y_in_fit(key):
    X, y = data("classification")
    la = build(DictModel(3), "classification", key)
    loader = DataLoader(DictData(X, y, key="labelz"), batch_size=8)
    with pytest.raises(KeyError) as as_key:
        la.fit(loader)
    with pytest.raises(ValueError, match="no target key dict_key_y='labels'"):
        la.fit(loader)
    assert str(as_key.value).startswith("Dict-like batch has no target key")
    assert "'labelz'" in str(as_key.value) and not la.is_fitted


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("key", KEYS)
def test_gridsearch_scores_dict_batches_with_dict_key_y(key, likelihood):
    """Dict batches with a custom target key give exactly the grid search of the
    same data as tuple batches."""
    X, y = data(likelihood, n=12)
    Xv, yv = data(likelihood, n=6, seed=3)
    grid = dict(method="gridsearch", grid_size=3, log_prior_prec_min=-1)
    la_dict = build(DictModel(3), likelihood, key, dict_key_y="target")
    la_dict.fit(DataLoader(DictData(X, y), batch_size=8))
    la_dict.optimize_prior_precision(
        val_loader=DataLoader(DictData(Xv, yv), batch_size=5), **grid
    )
    la_tuple = build(DictModel(3).body, likelihood, key)
    la_tuple.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    la_tuple.optimize_prior_precision(
        val_loader=DataLoader(TensorDataset(Xv, yv), batch_size=5), **grid
    )
    assert la_dict.prior_precision.tolist() == la_tuple.prior_precision.tolist()


BAD_TARGETS = {
    "classification": [
        torch.tensor([0, 1, 3, 2]),  # label 3 of 3 classes
        torch.tensor([0, -1, 1, 2]),
        torch.tensor([0.0, 1.0, 2.0, 1.0]),  # float labels
        torch.zeros(4, 3, dtype=torch.long),
    ],
    "regression": [
        torch.zeros(4, 2, dtype=torch.float64),  # 2 of 3 outputs
        torch.zeros(4, dtype=torch.float64),  # (batch,) with 3 outputs
        torch.zeros(4, 3, 1, dtype=torch.float64),
        torch.zeros(4, 3, dtype=torch.long),
    ],
}


@pytest.mark.parametrize("bad", range(4))
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("key", KEYS)
def test_gridsearch_checks_validation_targets_like_fit(key, likelihood, bad):
    X, y = data(likelihood)
    model = body(3)
    la = build(model, likelihood, key, prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    Xv, yv = data(likelihood, n=8, seed=2)
    y_bad = BAD_TARGETS[likelihood][bad]
    # good first batch, bad second one: nothing may be predicted before the error
    val = [(Xv[:4], yv[:4]), (Xv[4:], y_bad)]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError) as found:
            la.optimize_prior_precision(method="gridsearch", val_loader=val)
    finally:
        handle.remove()
    assert calls == [] and la.prior_precision.tolist() == [0.5]
    # the same message fit gives for those targets
    with pytest.raises(ValueError) as from_fit:
        likelihood_model(likelihood).check_targets(y_bad, 3)
    assert str(from_fit.value) in str(found.value)
    assert "val_loader batch 1" in str(found.value)
    fresh = build(body(3), likelihood, key)
    with pytest.raises(ValueError) as in_fit:
        fresh.fit(DataLoader(TensorDataset(Xv[4:], y_bad), batch_size=4))
    assert str(in_fit.value) == str(from_fit.value)


def test_gridsearch_rejects_empty_val_loader_and_regression_vector_targets_pass():
    X, y = data("regression", n_out=1)
    la = Laplace(body(1), "regression", "all", "diag")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    with pytest.raises(ValueError, match="no batches"):
        la.optimize_prior_precision(method="gridsearch", val_loader=[])
    Xv, yv = data("regression", n=6, seed=1, n_out=1)
    # (batch,) targets for one output are accepted, as in fit
    la.optimize_prior_precision(
        method="gridsearch", val_loader=[(Xv, yv[:, 0])], grid_size=3
    )
