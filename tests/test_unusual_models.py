"""Unusual models get a clear error on the first batch of ``fit`` (and before the
first prediction of a posterior loaded from a state dict) instead of a crash deep
inside torch or a silently wrong posterior: non-tensor outputs, outputs that are
not ``(batch, n_outputs)``, one-output classifiers, last-layer outputs that are
not the last layer applied to the features, tied or reused last layers."""

import pytest
import torch
from torch import nn

from laplace import FullLLLaplace, FunctionalLLLaplace, KronLLLaplace
from tests.model_zoo import (
    ALL_KEYS,
    KEY_IDS,
    Net,
    fit_laplace,
    loader,
    make_laplace,
)

LAST_LAYER_KEYS = [k for k in ALL_KEYS if k[0] == "last_layer"]
X_TEST = torch.randn(4, 3, generator=torch.Generator().manual_seed(9)).double()


# ---- 14.7: outputs that are not a tensor -------------------------------------------
@pytest.mark.parametrize("wrap", ["tuple", "list", "dict"])
@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_non_tensor_output_is_a_type_error_at_fit(key, wrap):
    la = make_laplace(Net(wrap=wrap), "classification", key)
    with pytest.raises(TypeError, match=f"returned a {wrap}.*Wrap the model"):
        fit_laplace(la, loader("classification"))
    assert not la.is_fitted


# classes whose checkpoints load without running the model (the GP views of a
# subset and VaLLA recompute Jacobians on load, so the check runs there)
LOADS_WITHOUT_FORWARD = [k for k in ALL_KEYS if k[1] not in ("gp", "variational")]


@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_non_tensor_output_is_a_type_error_at_predict(key):
    la = make_laplace(Net(), "classification", key)
    fit_laplace(la, loader("classification"))
    state = la.state_dict()
    restored = make_laplace(Net(wrap="tuple"), "classification", key)
    if key not in LOADS_WITHOUT_FORWARD:
        with pytest.raises(TypeError, match="returned a tuple"):
            restored.load_state_dict(state)
        return
    restored.load_state_dict(state)
    with pytest.raises(TypeError, match="returned a tuple.*Wrap the model"):
        restored(X_TEST)
    # checked once: the same posterior on a well-behaved model predicts as fitted
    ok = make_laplace(Net(), "classification", key)
    ok.load_state_dict(state)
    torch.testing.assert_close(ok(X_TEST), la(X_TEST), rtol=1e-12, atol=1e-14)


def test_loaded_posterior_of_another_output_count_is_refused():
    la = make_laplace(Net(n_out=2), "regression", ("all", "diag"))
    fit_laplace(la, loader("regression"))
    state = la.state_dict()
    other = make_laplace(Net(n_out=2), "regression", ("all", "diag"))
    state = {**state, "n_outputs": 3}
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="2 outputs.*n_outputs=3"):
        other(X_TEST)


# ---- 14.13: one-output classifiers and extra output dimensions ----------------------
@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_one_output_classifier_is_refused(key):
    la = make_laplace(Net(n_out=1), "classification", key)
    with pytest.raises(ValueError, match="at least 2 outputs.*has 1"):
        fit_laplace(la, loader("classification", n_out=1))
    assert not la.is_fitted


@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_one_output_regression_is_fine(key):
    la = make_laplace(Net(n_out=1), "regression", key)
    fit_laplace(la, loader("regression", n_out=1))
    f_mu, f_var = la(X_TEST)
    assert f_mu.shape == (4, 1) and f_var.shape == (4, 1, 1)
    assert torch.isfinite(f_var).all()


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_sequence_outputs_are_refused_without_reduction(key, likelihood):
    """``(batch, seq, C)`` outputs: every class refuses them; last-layer Laplace
    supports them only with ``feature_reduction`` (tests/test_llm.py)."""
    la = make_laplace(Net(wrap="seq"), likelihood, key)
    match = "applied to the features gives" if key[0] == "last_layer" else "(5, 3, 2)"
    with pytest.raises(ValueError, match=match):
        fit_laplace(la, loader(likelihood))
    assert not la.is_fitted


# ---- 14.8: last-layer outputs that are not the last layer's ------------------------
@pytest.mark.parametrize("key", LAST_LAYER_KEYS, ids=str)
def test_output_after_the_last_layer_is_refused(key):
    la = make_laplace(Net(wrap="tanh"), "regression", key)
    with pytest.raises(ValueError, match="not its last layer 'head'.*3 \\* tanh"):
        fit_laplace(la, loader("regression"))
    assert not la.is_fitted


@pytest.mark.parametrize("key", LAST_LAYER_KEYS, ids=str)
def test_output_after_the_last_layer_is_refused_before_predicting(key):
    la = make_laplace(Net(), "regression", key)
    fit_laplace(la, loader("regression"))
    restored = make_laplace(Net(wrap="tanh"), "regression", key)
    if key[1] == "gp":  # recomputes its Jacobians on load
        with pytest.raises(ValueError, match="not its last layer"):
            restored.load_state_dict(la.state_dict())
        return
    restored.load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="not its last layer"):
        restored(X_TEST)


def test_last_layer_check_is_tolerant_to_round_off_only():
    """float32: a feature reduction of the outputs equals the layer on the reduced
    features up to round-off, which passes; a tiny shift after the layer does
    not."""

    class Shifted(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)
            self.shift = shift

        def forward(self, x):
            return self.head(torch.tanh(self.body(x))).mean(1) + self.shift

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 5, 3, generator=gen)
    y = torch.randn(6, 2, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), 3)
    la = FullLLLaplace(Shifted(0.0), "regression", feature_reduction="average")
    la.fit(data)
    la = FullLLLaplace(Shifted(1e-2), "regression", feature_reduction="average")
    with pytest.raises(ValueError, match="not its last layer"):
        la.fit(data)


# ---- 14.11: tied or reused last layers ------------------------------------------------
class TiedNet(nn.Module):
    """The output layer's weight is the (square) hidden layer's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.out.weight = self.hidden.weight
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


class ReusedNet(nn.Module):
    """The output layer runs twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 4)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.out(torch.tanh(self.inp(x)))))


@pytest.mark.parametrize("cls", [FullLLLaplace, KronLLLaplace, FunctionalLLLaplace])
def test_tied_last_layer_is_refused(cls):
    kwargs = {"n_subset": 8} if cls is FunctionalLLLaplace else {}
    # named: at construction, before any work
    with pytest.raises(ValueError, match="out.weight is tied to 'hidden.weight'"):
        cls(TiedNet(), "regression", last_layer_name="out", **kwargs)
    # found on the first batch
    la = cls(TiedNet(), "regression", **kwargs)
    with pytest.raises(ValueError, match="tied"):
        fit_laplace(la, loader("regression", n_out=4))
    assert not la.is_fitted


@pytest.mark.parametrize("cls", [FullLLLaplace, KronLLLaplace, FunctionalLLLaplace])
@pytest.mark.parametrize("name", [None, "out"])
def test_reused_last_layer_is_refused(cls, name):
    kwargs = {"n_subset": 8} if cls is FunctionalLLLaplace else {}
    la = cls(ReusedNet(), "regression", last_layer_name=name, **kwargs)
    with pytest.raises(ValueError, match="'out' ran 2 times"):
        fit_laplace(la, loader("regression", n_out=4))


@pytest.mark.parametrize("name", [None, "out"])
def test_layer_registered_twice_but_run_once_is_fine(name):
    """An alias (``self.head = self.out``) is not a reuse."""
    model = TiedNet()
    model.out.weight = nn.Parameter(model.out.weight.detach().clone())  # untie
    model.alias = model.out
    la = FullLLLaplace(model, "regression", last_layer_name=name)
    la.fit(loader("regression", n_out=4))
    assert la.n_params == 20


def test_frozen_tied_weight_is_fine():
    """A tied weight without gradients is not part of the posterior."""
    model = TiedNet()
    model.out.weight.requires_grad_(False)
    la = FullLLLaplace(model, "regression", last_layer_name="out")
    fit_laplace(la, loader("regression", n_out=4))
    assert la.n_params == 4  # the bias only
