"""The one cache rule (laplace.utils.memo): values follow the identity of their
inputs, are never kept with an autograd graph, and a posterior's cached
quantities follow its hyperparameters and curvature however they are set."""

import copy
import pickle

import torch
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.utils.memo import Memo


def _counting():
    calls = []

    def compute():
        calls.append(1)
        return torch.tensor(float(len(calls)))

    return calls, compute


def test_values_follow_the_identity_of_their_inputs():
    memo, (calls, compute) = Memo(), _counting()
    a, b = torch.ones(2), torch.ones(2)
    first = memo.get("x", (a, 1.5), compute)
    assert memo.get("x", (a, 1.5), compute) is first and len(calls) == 1
    memo.get("x", (b, 1.5), compute)  # equal values, another object
    memo.get("x", (b, 2.5), compute)  # another number
    assert len(calls) == 3
    memo.get("y", (b, 2.5), compute)  # names are separate
    assert len(calls) == 4


def test_no_value_with_an_autograd_graph_is_kept():
    memo, (calls, compute) = Memo(), _counting()
    leaf = torch.ones(2, requires_grad=True)
    memo.get("x", (leaf,), compute)
    memo.get("x", (leaf,), compute)
    assert len(calls) == 2
    with torch.no_grad():  # no graph: kept
        memo.get("x", (leaf,), compute)
        memo.get("x", (leaf,), compute)
    assert len(calls) == 3


def test_copies_recompute():
    memo, (calls, compute) = Memo(), _counting()
    a = torch.ones(2)
    memo.get("x", (a,), compute)
    for clone in (copy.deepcopy(memo), pickle.loads(pickle.dumps(memo))):
        clone.get("x", (a,), compute)
    assert len(calls) == 3


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(20, 3, generator=gen), torch.randn(20, 2, generator=gen)


def _fitted(structure):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    la = Laplace(model, "regression", "all", structure)
    la.fit(DataLoader(TensorDataset(*_data()), batch_size=10))
    return la


def test_posterior_follows_in_place_updates_through_the_setters():
    for structure in ("full", "kron", "diag", "lowrank"):
        la = _fitted(structure)
        before = la.log_det_posterior_precision
        la.prior_precision *= 2  # in place on the stored tensor, then set
        after = la.log_det_posterior_precision
        fresh = _fitted(structure)
        fresh.prior_precision = 2.0
        torch.testing.assert_close(after, fresh.log_det_posterior_precision)
        assert not torch.allclose(before, after)
        la.sigma_noise = 0.5
        fresh.sigma_noise = torch.tensor(0.5)
        torch.testing.assert_close(
            la.log_det_posterior_precision, fresh.log_det_posterior_precision
        )


def test_a_new_curvature_gives_new_eigenvalues():
    la = _fitted("full")
    evals = la.H_eigenvalues
    la.H = 2 * la.H
    torch.testing.assert_close(la.H_eigenvalues, 2 * evals)


def test_kron_damping_set_after_fit_is_used():
    la = _fitted("kron")
    undamped = la.log_det_posterior_precision  # cached for damping=False
    la.damping = True
    # the same model and data, damped from the start
    damped = Laplace(la.model, "regression", "all", "kron", damping=True)
    damped.fit(DataLoader(TensorDataset(*_data()), batch_size=10))
    torch.testing.assert_close(
        la.log_det_posterior_precision, damped.log_det_posterior_precision
    )
    assert la.H.damping is True
    assert not torch.allclose(undamped, la.log_det_posterior_precision)
