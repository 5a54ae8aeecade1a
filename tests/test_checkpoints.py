"""Checkpoints of every class: ``state_dict()`` returns copies and survives
``torch.load(..., weights_only=True)``; ``load_state_dict`` validates the whole
dict against this model and structure before it assigns anything (type, keys,
entry types, shapes, finite values, valid hyperparameters), and a failing load
leaves the object -- fresh or fitted -- exactly as it was."""

import io
import math

import pytest
import torch
from ground_truth import tiny_net
from state_cases import (
    FUNCTIONAL,
    KINDS,
    PARAMETRIC,
    assert_same,
    assert_unchanged,
    assert_unfitted,
    attributes,
    fitted_copy,
    loader,
    make,
    observed,
)

from laplace import FullSubnetLaplace, Laplace
from laplace.checkpoint import StateDictKeyError
from laplace.parametric.checkpoint import REQUIRED_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(value):
    """Every tensor in a nested state dict."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _first_float(value):
    return next(t for t in _tensors(value) if t.is_floating_point() and t.numel())


# ---- round trips and copies ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_weights_only_into_a_fresh_object(kind):
    la, seen = fitted_copy(kind)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(kind)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(observed(fresh), seen)


@pytest.mark.parametrize("kind", KINDS)
def test_editing_a_state_dict_never_changes_the_posterior(kind):
    la, seen = fitted_copy(kind)
    state = la.state_dict()
    for tensor in _tensors(state):
        if tensor.is_floating_point():
            tensor.fill_(math.nan)
        else:
            tensor.fill_(0)
    assert_same(observed(la), seen)
    # nor does editing the dict a posterior was loaded from
    state = la.state_dict()
    fresh = make(kind)
    fresh.load_state_dict(state)
    for tensor in _tensors(state):
        tensor.zero_()
    assert_same(observed(fresh), seen)


# ---- validation --------------------------------------------------------------------------
def _set(key, value):
    def corrupt(state):
        state[key] = value(state[key]) if callable(value) else value

    return corrupt


def _nan_in(key):
    def corrupt(state):
        _first_float(state[key]).view(-1)[0] = math.nan

    return corrupt


# corruption -> (kinds it applies to, expected exception)
COMMON = {
    "loss_nan": (_set("loss", torch.tensor(math.nan)), ValueError),
    "loss_negative": (_set("loss", torch.tensor(-1.0)), ValueError),
    "loss_vector": (_set("loss", torch.ones(2)), ValueError),
    "prior_precision_negative": (
        _set("prior_precision", torch.tensor([-1.0])),
        ValueError,
    ),
    "prior_precision_nan": (
        _set("prior_precision", torch.tensor([math.nan])),
        ValueError,
    ),
    "prior_precision_length": (_set("prior_precision", torch.ones(3)), ValueError),
    "prior_precision_text": (_set("prior_precision", "big"), (ValueError, TypeError)),
    "sigma_noise_negative": (_set("sigma_noise", torch.tensor(-0.5)), ValueError),
    "temperature_negative": (_set("temperature", -1.0), ValueError),
    "n_data_text": (_set("n_data", "24"), TypeError),
    "n_data_zero": (_set("n_data", 0), ValueError),
    "n_outputs_float": (_set("n_outputs", 3.0), TypeError),
    "enable_backprop_int": (_set("enable_backprop", 1), TypeError),
    "likelihood_other": (_set("likelihood", "regression"), ValueError),
    "cls_name_other": (_set("cls_name", "SomethingLaplace"), ValueError),
}
PARAMETRIC_ONLY = {
    "mean_nan": (_nan_in("mean"), ValueError),
    "mean_longer": (_set("mean", lambda m: torch.cat([m, m[:1]])), ValueError),
    "mean_list": (_set("mean", lambda m: m.tolist()), TypeError),
    "H_nan": (_nan_in("H"), ValueError),
    "H_text": (_set("H", "H"), (TypeError, ValueError)),
    "prior_mean_wrong_length": (_set("prior_mean", torch.zeros(5)), ValueError),
}


def _H_wrong_shape(state):
    H = state["H"]
    if isinstance(H, list):  # Kron: factors of block 0 swapped
        H[0] = H[0][::-1]
    elif isinstance(H, dict):  # low rank: one eigenpair less
        H["eigenvectors"] = H["eigenvectors"][:, 1:]
    else:
        state["H"] = torch.cat([H, H[:1]])


PARAMETRIC_ONLY["H_wrong_shape"] = (_H_wrong_shape, ValueError)
FUNCTIONAL_ONLY = {
    "gp": {"subset_inputs_nan": (_nan_in("subset_inputs"), ValueError)},
    "ll_gp": {
        "subset_inputs_fewer": (_set("subset_inputs", lambda X: X[:5]), ValueError),
        "last_layer_name_int": (_set("last_layer_name", 2), TypeError),
    },
    "ella": {
        "feature_gram_nan": (_nan_in("feature_gram"), ValueError),
        "dual_directions_rows": (
            _set("dual_directions", lambda V: V[:-1]),
            ValueError,
        ),
        "fit_history_list": (_set("fit_history", []), TypeError),
    },
    "valla": {
        "L_nan": (_nan_in("L"), ValueError),
        "L_longer": (_set("L", lambda L: torch.cat([L, L])), ValueError),
        "inducing_classes_float": (
            _set("inducing_classes", torch.tensor([0.5])),
            ValueError,
        ),
    },
}

CORRUPTIONS = [
    (kind, name)
    for kind in KINDS
    for name in [
        *COMMON,
        *(PARAMETRIC_ONLY if kind in PARAMETRIC else FUNCTIONAL_ONLY[kind]),
    ]
]


def _corruption(kind, name):
    table = {**COMMON, **PARAMETRIC_ONLY, **FUNCTIONAL_ONLY.get(kind, {})}
    return table[name]


@pytest.mark.parametrize(
    "kind,name", CORRUPTIONS, ids=[f"{k}-{n}" for k, n in CORRUPTIONS]
)
def test_invalid_state_dict_is_refused_and_changes_nothing(kind, name):
    corrupt, error = _corruption(kind, name)
    source, seen = fitted_copy(kind)
    state = source.state_dict()
    corrupt(state)
    # a fresh object stays fresh
    fresh = make(kind)
    before = attributes(fresh)
    with pytest.raises(error):
        fresh.load_state_dict(state)
    assert_unchanged(fresh, before)
    assert_unfitted(fresh)
    # a fitted one keeps its posterior
    before = attributes(source)
    with pytest.raises(error):
        source.load_state_dict(state)
    assert_unchanged(source, before)
    assert_same(observed(source), seen)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_keys_are_named_by_an_error_both_key_and_value_error(kind):
    la, _ = fitted_copy(kind)
    state = la.state_dict()
    required = REQUIRED_KEYS if kind in PARAMETRIC else list(state)
    for key in required:
        partial = {k: v for k, v in state.items() if k != key}
        fresh = make(kind)
        before = attributes(fresh)
        with pytest.raises(StateDictKeyError, match=key) as info:
            fresh.load_state_dict(partial)
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert str(info.value).startswith("State dict")  # readable, no quotes
        assert_unchanged(fresh, before)


@pytest.mark.parametrize("kind", ["full", "ll_kron", "gp", "valla"])
@pytest.mark.parametrize("bad", [None, [], "state", torch.zeros(3)], ids=repr)
def test_a_non_dict_is_a_type_error(kind, bad):
    la = make(kind)
    before = attributes(la)
    with pytest.raises(TypeError, match="dict"):
        la.load_state_dict(bad)
    assert_unchanged(la, before)


@pytest.mark.parametrize("kind", ["subnet_full", "subnet_diag"])
def test_subnetwork_state_dict_of_a_wider_model_is_refused(kind):
    wider = tiny_net(5)  # 2 -> 4 -> 5: 37 parameters
    indices = torch.tensor([0, 3, 7, 12, 20, 36])
    structure = kind.removeprefix("subnet_")
    la = Laplace(
        wider, "classification", "subnetwork", structure, subnetwork_indices=indices
    )
    X = torch.randn(24, 2, generator=torch.Generator().manual_seed(0))
    la.fit(loader(X=X, y=torch.arange(24) % 5))
    state = la.state_dict()
    ours = make(kind)
    before = attributes(ours)
    with pytest.raises(ValueError, match="subnetwork_indices|another model"):
        ours.load_state_dict(state)
    assert_unchanged(ours, before)
    # also without the indices (laplace-torch's format): the mean does not fit
    del state["subnetwork_indices"]
    with pytest.raises(ValueError, match="another model"):
        ours.load_state_dict(state)
    assert_unchanged(ours, before)


def test_subnetwork_state_dict_with_other_indices_is_refused():
    la, _ = fitted_copy("subnet_full")
    other_indices = torch.tensor([1, 3, 7, 12, 20, 26])
    other = FullSubnetLaplace(tiny_net(3), "classification", other_indices)
    before = attributes(other)
    with pytest.raises(ValueError, match="subnetwork_indices"):
        other.load_state_dict(la.state_dict())
    assert_unchanged(other, before)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_last_layer_is_found_again_from_the_saved_first_batch(structure):
    la, seen = fitted_copy(f"ll_{structure}")
    state = la.state_dict()
    assert state["_last_layer_name"] is None and state["last_layer_name"] == "2"
    X, y = state["data"]
    assert X.shape == (10, 2) and y.shape == (10,)
    # laplace-torch's format: only the first batch tells where the last layer is
    del state["last_layer_name"]
    fresh = make(f"ll_{structure}")
    fresh.load_state_dict(state)
    assert fresh.model.last_layer_name == "2"
    assert_same(observed(fresh), seen)


def test_failed_load_forgets_a_last_layer_found_on_the_way():
    la, _ = fitted_copy("ll_kron")
    state = la.state_dict()
    state["H"][1][0].fill_(math.nan)
    fresh = make("ll_kron")
    with pytest.raises(ValueError, match="NaN"):
        fresh.load_state_dict(state)
    assert fresh.model.last_layer is None and fresh.H is None
    del state["data"], state["last_layer_name"]
    with pytest.raises(StateDictKeyError, match="data"):
        fresh.load_state_dict(state)
    assert fresh.model.last_layer is None


def test_lowrank_negative_eigenvalues_are_refused():
    la, _ = fitted_copy("lowrank")
    state = la.state_dict()
    state["H"]["eigenvalues"][0] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        make("lowrank").load_state_dict(state)


def test_asymmetric_full_curvature_is_refused():
    la, _ = fitted_copy("full")
    state = la.state_dict()
    state["H"][0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        make("full").load_state_dict(state)


@pytest.mark.parametrize("kind", FUNCTIONAL)
def test_unexpected_keys_are_refused_by_function_space_classes(kind):
    la, _ = fitted_copy(kind)
    state = {**la.state_dict(), "extra": 1}
    with pytest.raises(ValueError, match="unexpected keys"):
        make(kind).load_state_dict(state)


def test_extra_keys_are_fine_for_weight_space_classes():
    # laplace-torch and we save different extras; each ignores the other's
    la, seen = fitted_copy("diag")
    fresh = make("diag")
    fresh.load_state_dict({**la.state_dict(), "saved_by": "someone else"})
    assert_same(observed(fresh), seen)
