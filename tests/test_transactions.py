"""``fit`` is a transaction: batches are checked and summed into scratch state,
and only a fit that completes replaces the posterior. After a failing fit (a
NaN batch, a bad label in a later batch, an error raised by the model in the
middle of the pass) the object is exactly as before: a fresh one stays unfitted,
a fitted one keeps its state dict, predictions and marginal likelihood bit for
bit -- for every class, with ``override=True`` and ``override=False``."""

import functools
from copy import deepcopy

import pytest
import torch
from ground_truth import tiny_data, tiny_net
from state_cases import (
    CONTINUAL,
    KINDS,
    PARAMETRIC,
    assert_same,
    assert_unchanged,
    assert_unfitted,
    attributes,
    fit,
    loader,
    make,
    observed,
)
from torch import nn

# tiny tensors: one thread avoids thread start-up on a busy machine
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # expected on the way to the failures tested here
    pytest.mark.filterwarnings("ignore:torch.func.vmap failed on this model"),
    pytest.mark.filterwarnings("ignore:Only 0 of n_eigenvalues"),
]

FAILURES = ["nan_batch", "bad_label", "model_raises"]


class RaisingNet(nn.Module):
    """``tiny_net(3)`` that raises on its ``raise_at``-th call (when armed)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(3)
        self.calls, self.raise_at = 0, None

    def forward(self, x):
        self.calls += 1
        if self.raise_at is not None and self.calls >= self.raise_at:
            raise RuntimeError("the model failed in the middle of the fit")
        return self.net(x)


def _bad_loader(failure):
    X, y = tiny_data("classification", 3, 24)
    if failure == "nan_batch":
        X = X.clone()
        X[10:20] = float("nan")  # the whole second batch
    elif failure == "bad_label":
        y = y.clone()
        y[10:20] = 7  # the second batch; the model has 3 classes
    return loader(X=X, y=y)


@functools.cache
def _calls_of_a_fit(kind, fitted_before, override):
    """How often a fit calls the model (on an object in the same state)."""
    probe = make(kind, model=RaisingNet())
    if fitted_before:
        fit(probe, loader())
    counter = _inner(probe)
    counter.calls = 0
    fit(probe, loader(), override=override)
    return counter.calls


def _inner(la):
    """The RaisingNet inside ``la.model`` (last-layer classes wrap a copy)."""
    return next(m for m in la.model.modules() if isinstance(m, RaisingNet))


def _failing_fit(kind, la, failure, fitted_before, override=True):
    train = loader() if failure == "model_raises" else _bad_loader(failure)
    if failure == "model_raises":
        # half-way through the pass
        calls = _calls_of_a_fit(kind, fitted_before, override)
        _inner(la).calls, _inner(la).raise_at = 0, max(2, calls // 2 + 1)
    with pytest.raises((ValueError, RuntimeError)) as info:
        fit(la, train, override=override)
    if failure == "model_raises":
        assert "middle of the fit" in str(info.value)
        _inner(la).raise_at = None


@functools.cache
def _reference(kind):
    """A fitted object and what it shows; tests work on copies of it."""
    la = make(kind, model=RaisingNet())
    fit(la, loader())
    return la, observed(la)


def _fitted_copy(kind):
    la, seen = _reference(kind)
    return deepcopy(la), seen


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", KINDS)
def test_failed_fit_leaves_a_fresh_object_unfitted(kind, failure):
    la = make(kind, model=RaisingNet())
    before = attributes(la)
    _failing_fit(kind, la, failure, fitted_before=False)
    assert_unchanged(la, before)
    assert_unfitted(la)
    if kind.startswith("ll_") and "named" not in kind:
        assert la.model.last_layer is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_fit_after_a_failed_one_equals_a_fresh_fit(kind):
    la = make(kind, model=RaisingNet())
    _failing_fit(kind, la, "nan_batch", fitted_before=False)
    fit(la, loader())
    assert_same(observed(la), _reference(kind)[1])


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", KINDS)
def test_failed_refit_keeps_the_fitted_posterior(kind, failure):
    la, seen = _fitted_copy(kind)
    before = attributes(la)
    _failing_fit(kind, la, failure, fitted_before=True)
    assert_unchanged(la, before)
    assert_same(observed(la), seen)


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("kind", [*CONTINUAL, "valla"])
def test_failed_continual_fit_adds_nothing(kind, failure):
    la, seen = _fitted_copy(kind)
    before = attributes(la)
    _failing_fit(kind, la, failure, fitted_before=True, override=False)
    assert_unchanged(la, before)
    assert_same(observed(la), seen)


@pytest.mark.parametrize("kind", [*CONTINUAL, "valla"])
def test_continual_fit_after_a_failed_one_adds_the_data_once(kind):
    la, _ = _fitted_copy(kind)
    _failing_fit(kind, la, "bad_label", fitted_before=True, override=False)
    fit(la, loader(), override=False)
    reference, _ = _fitted_copy(kind)
    fit(reference, loader(), override=False)
    assert la.n_data == (48 if kind in PARAMETRIC else 24)
    assert_same(observed(la), observed(reference))


@pytest.mark.parametrize("kind", ["full", "kron", "diag", "ll_kron", "subnet_diag"])
def test_failed_regression_fit_with_wrong_target_shape(kind):
    la = make(kind, "regression")
    X, y = tiny_data("regression", 3, 24)
    fit(la, loader("regression", X, y))
    seen, before = observed(la), attributes(la)
    with pytest.raises(ValueError, match="targets"):
        fit(la, loader("regression", X, y[:, :2]), override=False)
    assert_unchanged(la, before)
    assert_same(observed(la), seen)


def test_an_empty_loader_changes_nothing():
    la = make("full")
    fit(la, loader())
    seen, before = observed(la), attributes(la)
    empty = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(0, 2), torch.zeros(0).long())
    )
    with pytest.raises(ValueError):
        la.fit(empty)
    assert_unchanged(la, before)
    assert_same(observed(la), seen)
