"""Every Laplace class on the tiny float64 MLP of ``ground_truth`` (2 -> 4 -> 3),
with helpers to fit it and to capture its observable state: shared by the tests
of unfitted objects, fit transactions and checkpoints."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from ground_truth import tiny_data, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.approximation import NotFittedError
from laplace.functional import ELLA, FunctionalLaplace, FunctionalLLLaplace, VaLLA

N, N_OUT, BATCH = 24, 3, 10
SUBNET = torch.tensor([0, 3, 7, 12, 20, 26])
X_TEST = torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(5, 2)

PARAMETRIC = [
    "full",
    "kron",
    "diag",
    "lowrank",
    "ll_full",
    "ll_kron",
    "ll_diag",
    "ll_named_full",
    "subnet_full",
    "subnet_diag",
]
FUNCTIONAL = ["gp", "ll_gp", "ella", "valla"]
KINDS = PARAMETRIC + FUNCTIONAL
#: classes whose fit(..., override=False) adds data to the posterior
CONTINUAL = [k for k in PARAMETRIC if k != "lowrank"]


def make(kind: str, likelihood: str = "classification", model: Any = None) -> Any:
    """A fresh object of ``kind`` on ``model`` (default: ``tiny_net(3)``)."""
    model = tiny_net(N_OUT) if model is None else model
    lik = likelihood
    if kind in ("full", "kron", "diag"):
        return Laplace(model, lik, "all", kind, prior_precision=0.5)
    if kind == "lowrank":
        return Laplace(model, lik, "all", "lowrank", backend_kwargs={"low_rank": 14})
    if kind.startswith("ll_named_"):
        structure = kind.removeprefix("ll_named_")
        name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        return Laplace(model, lik, "last_layer", structure, last_layer_name=name)
    if kind.startswith("ll_") and kind != "ll_gp":
        return Laplace(model, lik, "last_layer", kind.removeprefix("ll_"))
    if kind.startswith("subnet_"):
        structure = kind.removeprefix("subnet_")
        return Laplace(
            model, lik, "subnetwork", structure, subnetwork_indices=SUBNET.clone()
        )
    if kind == "gp":
        return FunctionalLaplace(model, lik, n_subset=12)
    if kind == "ll_gp":
        return FunctionalLLLaplace(model, lik, n_subset=12)
    if kind == "ella":
        return ELLA(model, lik, subsample_size=12, n_eigenvalues=5)
    if kind == "valla":
        return VaLLA(model, lik, "random", num_inducing=3)
    raise ValueError(kind)


def loader(likelihood: str = "classification", X=None, y=None) -> DataLoader:
    if X is None:
        X, y = tiny_data(likelihood, N_OUT, N)
    return DataLoader(TensorDataset(X, y), batch_size=BATCH)


def fit(la: Any, train_loader: Any, override: bool = True) -> None:
    """``la.fit`` with each class's keywords (VaLLA: a few iterations)."""
    if isinstance(la, VaLLA):
        la.fit(train_loader, iterations=3, override=override)
    elif isinstance(la, FunctionalLaplace | ELLA):
        assert override
        la.fit(train_loader)
    else:
        la.fit(train_loader, override=override)


def fitted(kind: str, likelihood: str = "classification") -> Any:
    la = make(kind, likelihood)
    fit(la, loader(likelihood))
    return la


@functools.cache
def _reference(kind: str) -> tuple[Any, dict[str, Any]]:
    la = fitted(kind)
    return la, observed(la)


def fitted_copy(kind: str) -> tuple[Any, dict[str, Any]]:
    """A copy of a (cached) fitted object of ``kind`` and what it shows."""
    la, seen = _reference(kind)
    return deepcopy(la), seen


def observed(la: Any) -> dict[str, Any]:
    """What a user sees of a fitted object: its state dict, predictions and (where
    defined) marginal likelihood, all detached."""
    out = la(X_TEST)
    state = {
        "state_dict": la.state_dict(),
        "n_data": la.n_data,
        "predictions": out if isinstance(out, tuple) else (out,),
    }
    try:
        state["lml"] = la.log_marginal_likelihood().detach()
    except NotImplementedError:  # ELLA, VaLLA
        pass
    return state


def assert_same(a: Any, b: Any) -> None:
    """Bit-for-bit equality of nested tensors, containers and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype
        assert a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def attributes(la: Any) -> dict[str, Any]:
    """The object's attributes (identity snapshot) and its last layer, if any."""
    snap = dict(vars(la))
    snap["<last_layer>"] = getattr(la.model, "last_layer", None)
    return snap


def assert_unchanged(la: Any, before: dict[str, Any]) -> None:
    """Every attribute is the very object it was (nothing reassigned, nothing
    added or dropped), so the object is exactly as before."""
    after = attributes(la)
    assert after.keys() == before.keys()
    changed = [k for k in before if after[k] is not before[k]]
    assert not changed, changed


def assert_unfitted(la: Any) -> None:
    assert not la.is_fitted
    try:
        la(X_TEST)
    except NotFittedError:
        return
    raise AssertionError("an unfitted object predicted")


@contextmanager
def single_thread():
    """One torch thread (as the ``one_thread`` fixture, usable inside hypothesis
    tests, which do not take function-scoped fixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
