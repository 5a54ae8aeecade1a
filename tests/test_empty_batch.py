"""Predicting on an empty batch gives outputs without rows of the shapes a
non-empty batch has, for every class, pred_type and option; ``sample(0)`` gives
``(0, P)`` and a negative count a ValueError."""

import warnings

import pytest
import torch
from test_dtypes import SPECS, build, fit, model_and_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    """Fitted objects per (likelihood, subset, structure), float64."""
    cache = {}

    def get(likelihood, subset, structure):
        key = (likelihood, subset, structure)
        if key not in cache:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                model, X, y = model_and_data(likelihood)
                la = build(model, likelihood, subset, structure)
                cache[key] = fit(la, X, y), X
            finally:
                torch.set_default_dtype(previous)
        return cache[key]

    return get


def expected_shapes(classification, K, joint, diagonal, nn):
    if classification:
        return [(0, K)]
    if joint:
        return [(0,), (0, 0)]
    if diagonal or nn:
        return [(0, K), (0, K)]
    return [(0, K), (0, K, K)]


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("subset,structure", SPECS)
def test_empty_batch_predictions(fitted, likelihood, subset, structure):
    la, X = fitted(likelihood, subset, structure)
    K = 2 if likelihood == "regression" else 3
    classification = likelihood == "classification"
    functional = subset in ("ella", "valla") or structure == "gp"
    empty = X[:0]
    options = [{}, {"diagonal_output": True}]
    if classification:
        options += [{"link_approx": link} for link in ("bridge", "bridge_norm", "mc")]
    else:
        options.append({"joint": True})
    calls = [
        ({"pred_type": "gp" if functional else "glm", **o}, False) for o in options
    ]
    if not functional:
        calls += [({"pred_type": "nn", "link_approx": "mc", "n_samples": 3}, True)]
    for kwargs, nn in calls:
        out = la(empty, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        shapes = expected_shapes(
            classification,
            K,
            kwargs.get("joint", False),
            kwargs.get("diagonal_output", False),
            nn,
        )
        assert [tuple(o.shape) for o in outs] == shapes, kwargs
        assert all(o.dtype == torch.float64 for o in outs)
    draws = la.functional_samples(empty, n_samples=4)
    assert draws.shape == (4, 0, K)
    assert la.predictive_samples(empty, n_samples=4).shape == (4, 0, K)
    if functional:
        mean, var = la.predictive_moments(empty)
        assert mean.shape == (0, K) and var.shape == (0, K, K)
        mean, var = la.predictive_moments(empty, joint=True)
        assert mean.shape == (0,) and var.shape == (0, 0)
    elif subset == "last_layer":
        f_mu, f_var = la.functional_variance_fast(empty)
        assert f_mu.shape == f_var.shape == (0, K)


WEIGHT_SPACE = [s for s in SPECS if s[1] not in ("gp", None)]


@pytest.mark.parametrize("subset,structure", WEIGHT_SPACE)
def test_sample_counts(fitted, subset, structure):
    la, _ = fitted("classification", subset, structure)
    n_all = sum(p.numel() for p in la.model.parameters() if p.requires_grad)
    width = n_all if subset == "subnetwork" else la.n_params
    assert la.sample(0).shape == (0, width)
    assert la.sample(0, generator=torch.Generator()).dtype == torch.float64
    assert la.sample(2).shape == (2, width)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="n_samples"):
            la.sample(bad)


def test_empty_batch_of_preference_pairs_has_pair_shape():
    """Reward models: the output width of the empty batch is that of the model
    on it (2 for pairs, 1 for single items)."""
    from test_reward_modeling import RewardModel, pairs
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import Laplace

    torch.set_default_dtype(torch.float64)
    X, y = pairs()
    for subset in ("all", "last_layer"):
        la = Laplace(RewardModel().double(), "reward_modeling", subset, "kron")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
        mean, var = la(X[:0])
        assert mean.shape == (0, 2) and var.shape == (0, 2, 2)
        assert la(X[:0], fitting=True).shape == (0, 2)
        mean, var = la(X[:0, 0])
        assert mean.shape == (0, 1) and var.shape == (0, 1, 1)
