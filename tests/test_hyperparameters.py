"""Hyperparameter validation (issue 13.4): sigma_noise, prior_precision and
prior_mean accept exactly laplace-torch 0.3's forms (plus our positivity and
finiteness checks), for every class, through the class and the factory, at
construction and through the setters."""

import math

import pytest
import torch
from api_cases import CASE_IDS, CASES

from laplace.utils.hyperparameters import (
    check_prior_mean,
    check_prior_precision,
    check_sigma_noise,
    check_temperature,
)

VIA = ["class", "factory"]

NOT_NUMBERS = ["1.0", [1.0], (1.0,), None, {"a": 1.0}, True, 1j]
BAD_SCALAR_SHAPES = [torch.ones(1, 1), torch.ones(2, 2), torch.ones(1, 1, 1)]


# ---- the validator functions --------------------------------------------------
@pytest.mark.parametrize(
    "value", [0.5, 2, torch.tensor(0.5), torch.tensor([0.5]), torch.tensor(3)]
)
def test_check_sigma_noise_accepts(value):
    out = check_sigma_noise(value)
    assert out.shape == () and out.is_floating_point()
    assert float(out) == float(torch.as_tensor(value))


@pytest.mark.parametrize(
    "value",
    [
        *NOT_NUMBERS,
        *BAD_SCALAR_SHAPES,
        torch.ones(2),
        torch.ones(0),
        0.0,
        -1.0,
        math.nan,
        math.inf,
        torch.tensor([True]),
    ],
)
def test_check_sigma_noise_rejects(value):
    with pytest.raises(ValueError, match="sigma_noise"):
        check_sigma_noise(value)


def test_check_prior_precision_lengths_and_message():
    lengths = {1: "scalar", 3: "one per layer", 7: "one per parameter"}
    for n in (1, 3, 7):
        assert check_prior_precision(torch.ones(n), lengths).shape == (n,)
    assert check_prior_precision(2.0, lengths).shape == (1,)
    assert check_prior_precision(torch.tensor(2.0), lengths).shape == (1,)
    msg = r"prior_precision has length 4; Foo accepts length 1 \(scalar\) or 3 \(one"
    with pytest.raises(ValueError, match=msg):
        check_prior_precision(torch.ones(4), lengths, "Foo")
    # sizes unknown: any length
    assert check_prior_precision(torch.ones(4)).shape == (4,)


@pytest.mark.parametrize(
    "value", [*NOT_NUMBERS, *BAD_SCALAR_SHAPES, torch.ones(0), 0.0, -2.0, math.nan]
)
def test_check_prior_precision_rejects(value):
    with pytest.raises(ValueError, match="prior_precision"):
        check_prior_precision(value)


@pytest.mark.parametrize(
    "value", [*NOT_NUMBERS, *BAD_SCALAR_SHAPES, torch.ones(0), math.nan, math.inf]
)
def test_check_prior_mean_rejects(value):
    with pytest.raises(ValueError, match="prior_mean"):
        check_prior_mean(value)


def test_check_prior_mean_keeps_shape_and_allows_any_sign():
    assert check_prior_mean(-1.5).shape == ()
    assert check_prior_mean(torch.tensor([-1.0])).shape == (1,)
    assert check_prior_mean(torch.zeros(5), {1: "scalar", 5: "all"}).shape == (5,)
    with pytest.raises(ValueError, match="prior_mean has length 4"):
        check_prior_mean(torch.zeros(4), {1: "scalar", 5: "all"})


def test_validators_keep_the_autograd_graph():
    log = torch.tensor([0.3], requires_grad=True)
    (check_prior_precision(log.exp()).sum() + check_sigma_noise(log.exp())).backward()
    torch.testing.assert_close(log.grad, 2 * log.exp().detach())


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, "1", torch.ones(2), None])
def test_check_temperature_rejects(value):
    with pytest.raises(ValueError, match="temperature"):
        check_temperature(value)


# ---- through every class, constructor and setters -----------------------------
def _ok_sigma_values():
    return [0.5, 2, torch.tensor(0.5), torch.tensor([0.5])]


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sigma_noise_rules(case, via):
    for value in _ok_sigma_values():
        la = case.build(via, sigma_noise=value)
        assert la.sigma_noise.shape == ()
        assert float(la.sigma_noise) == float(torch.as_tensor(value))
    for value in [*NOT_NUMBERS, *BAD_SCALAR_SHAPES, torch.ones(2), 0.0, -1.0]:
        with pytest.raises(ValueError, match="sigma_noise"):
            case.build(via, sigma_noise=value)
    la = case.build(via, sigma_noise=0.7)
    for value in [torch.ones(1, 1), "0.3", [0.3], -0.3]:
        with pytest.raises(ValueError, match="sigma_noise"):
            la.sigma_noise = value
        assert float(la.sigma_noise) == pytest.approx(0.7)  # unchanged
    # classification: must be 1
    case.build(via, "classification", sigma_noise=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigma_noise=2.0 is only meaningful"):
        case.build(via, "classification", sigma_noise=2.0)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prior_precision_rules(case, via):
    for value in [0.5, 3, torch.tensor(0.5)]:
        la = case.build(via, prior_precision=value)
        assert la.prior_precision.shape == (1,)
    for n in case.precision_lengths:
        la = case.build(via, prior_precision=torch.rand(n) + 0.5)
        assert la.prior_precision.shape == (n,)
        assert la.prior_precision_diag.shape == (case.n_params,)
    wrong = [n for n in (2, case.n_layers, case.n_params, case.n_params + 1)]
    wrong = [n for n in wrong if n not in case.precision_lengths]
    assert wrong
    for n in wrong:
        with pytest.raises(ValueError, match=f"prior_precision has length {n}; "):
            case.build(via, prior_precision=torch.ones(n))
    bad = [*NOT_NUMBERS, *BAD_SCALAR_SHAPES, 0.0, -1.0, math.nan, torch.ones(0)]
    for value in bad:
        with pytest.raises(ValueError, match="prior_precision"):
            case.build(via, prior_precision=value)
    la = case.build(via, prior_precision=0.25)
    for value in [torch.ones(2, 2), torch.ones(1, 1), "1", -1.0, torch.ones(wrong[0])]:
        with pytest.raises(ValueError, match="prior_precision"):
            la.prior_precision = value
        assert la.prior_precision.tolist() == [0.25]  # unchanged


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prior_mean_rules(case, via):
    scale = 0.0 if case.zero_mean_only else 1.0
    la = case.build(via, prior_mean=0.3 * scale)
    assert la.prior_mean.shape == () and float(la.prior_mean) == 0.3 * scale
    assert case.build(via, prior_mean=torch.tensor(scale)).prior_mean.shape == ()
    for n in case.mean_lengths:
        la = case.build(via, prior_mean=scale * torch.randn(n))
        assert la.prior_mean.shape == (n,)
    for n in (2, case.n_params + 1):
        with pytest.raises(ValueError, match=f"prior_mean has length {n}; "):
            case.build(via, prior_mean=torch.zeros(n))
    bad = [*NOT_NUMBERS, *BAD_SCALAR_SHAPES, math.nan, torch.zeros(0)]
    for value in bad:
        with pytest.raises(ValueError, match="prior_mean"):
            case.build(via, prior_mean=value)
    la = case.build(via)
    for value in [torch.zeros(1, 1), "0", [0.0], torch.zeros(2)]:
        with pytest.raises(ValueError, match="prior_mean"):
            la.prior_mean = value
        assert la.prior_mean.shape == () and float(la.prior_mean) == 0.0


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_hyperparameters_validates_without_assigning(case):
    la = case.build("class", prior_precision=0.5)
    checked = la._check_hyperparameters(
        prior_precision=torch.tensor([2.0]), sigma_noise=0.3, temperature=0.5
    )
    assert checked["prior_precision"].tolist() == [2.0]
    assert checked["sigma_noise"].dtype == la.sigma_noise.dtype
    assert checked["temperature"] == 0.5
    assert la.prior_precision.tolist() == [0.5] and la.temperature == 1.0
    with pytest.raises(ValueError, match="prior_precision"):
        la._check_hyperparameters(sigma_noise=0.3, prior_precision=torch.ones(2, 2))
