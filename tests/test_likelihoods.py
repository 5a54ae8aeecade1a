"""The likelihood objects against independent ground truth: loss Hessians from
``torch.func.hessian`` of the torch loss, Monte Carlo roots against the exact
Hessian, log-likelihoods from ``torch.distributions``."""

import math

import pytest
import torch
from torch.func import hessian

from laplace.likelihoods import (
    ClassificationLikelihood,
    RegressionLikelihood,
    RewardModelingLikelihood,
    likelihood_model,
)
from laplace.utils.enums import Likelihood

KINDS = ["regression", "classification", "reward_modeling"]


def _outputs(n=5, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g, dtype=torch.float64)


def _targets(lik, f, seed=1):
    g = torch.Generator().manual_seed(seed)
    if lik.kind is Likelihood.REGRESSION:
        return torch.randn(f.shape, generator=g, dtype=f.dtype)
    return torch.randint(f.shape[1], (len(f),), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_model_lookup_and_errors(kind):
    lik = likelihood_model(kind)
    assert lik.kind is Likelihood(kind)
    assert likelihood_model(Likelihood(kind)) is lik
    assert likelihood_model(lik) is lik
    with pytest.raises(ValueError, match="likelihood"):
        likelihood_model("poisson")


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_root_squares_to_the_loss_hessian(kind):
    lik = likelihood_model(kind)
    f = _outputs()
    y = _targets(lik, f)
    L = lik.hessian_root(f)
    for n in range(len(f)):

        def loss_n(fn, n=n):
            return lik.loss_factor * lik.loss_function()(fn[None], y[n : n + 1])

        truth = hessian(loss_n)(f[n])
        torch.testing.assert_close(L[n] @ L[n].T, truth, rtol=1e-10, atol=1e-12)
        d, v = lik.hessian_parts(f[n : n + 1])
        parts = torch.diag(d[0]) - (0 if v is None else torch.outer(v[0], v[0]))
        torch.testing.assert_close(parts, truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_root_is_unbiased(kind):
    lik = likelihood_model(kind)
    f = _outputs(n=2, C=3)
    S = 200_000
    L = lik.sampled_root(f, S, torch.Generator().manual_seed(3))
    assert L.shape == (2, 3, S)
    exact = lik.hessian_root(f)
    for n in range(2):
        # entries of E[L L^T] are averages of S products: 6 standard errors
        torch.testing.assert_close(
            L[n] @ L[n].T, exact[n] @ exact[n].T, rtol=0, atol=6 / math.sqrt(S)
        )


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_the_backends_summed_convention(kind):
    lik = likelihood_model(kind)
    f = _outputs()
    y = _targets(lik, f)
    if lik.kind is Likelihood.REGRESSION:
        expected = 0.5 * (f - y).square().sum()
    else:
        expected = -torch.log_softmax(f, -1).gather(1, y[:, None]).sum()
    torch.testing.assert_close(lik.loss(f, y), expected, rtol=1e-12, atol=0)


def test_regression_log_likelihood_is_gaussian():
    lik = RegressionLikelihood()
    f, y = _outputs(), _outputs(seed=5)
    sigma = torch.tensor(0.7, dtype=torch.float64)
    expected = torch.distributions.Normal(f, sigma).log_prob(y).sum()
    got = lik.log_likelihood(lik.loss(f, y), 5, 4, sigma, 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # tempered: the data term divided by T, the normaliser kept
    T = 2.0
    normalizer = 20 * torch.log(sigma * math.sqrt(2 * math.pi))
    got_T = lik.log_likelihood(lik.loss(f, y), 5, 4, sigma, T)
    torch.testing.assert_close(
        got_T, (expected + normalizer) / T - normalizer, rtol=1e-12, atol=0
    )


def test_classification_log_likelihood_is_categorical():
    lik = ClassificationLikelihood()
    f = _outputs()
    y = _targets(lik, f)
    expected = torch.distributions.Categorical(logits=f).log_prob(y).sum()
    one = torch.tensor(1.0, dtype=torch.float64)
    got = lik.log_likelihood(lik.loss(f, y), 5, 4, one, 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_regression_criterion_scale_gives_the_log_likelihood():
    lik = RegressionLikelihood()
    f, y = _outputs(), _outputs(seed=5)
    sigma = torch.tensor(0.3, dtype=torch.float64)
    mse = lik.loss_function("mean")(f, y)
    c = lik.criterion_scale(sigma, 1.0)
    normal = torch.distributions.Normal(f, sigma).log_prob(y).sum()
    normalizer = f.numel() * torch.log(sigma * math.sqrt(2 * math.pi))
    # mean over all entries: N * O entries
    torch.testing.assert_close(
        -f.numel() * c * mse - normalizer, normal, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "kind, y, n_outputs, error",
    [
        ("regression", torch.zeros(4, 2), 3, "Regression targets"),
        ("regression", torch.zeros(4, 1, dtype=torch.long), 1, "float tensor"),
        ("classification", torch.tensor([0, 3]), 3, r"\[0, 3\)"),
        ("classification", torch.zeros(2), 3, "integer"),
        ("reward_modeling", torch.tensor([0, 2]), 1, r"\[0, 2\)"),
    ],
)
def test_bad_targets_are_refused(kind, y, n_outputs, error):
    with pytest.raises(ValueError, match=error):
        likelihood_model(kind).check_targets(y, n_outputs)


def test_targets_are_reshaped_not_broadcast():
    lik = RegressionLikelihood()
    assert lik.check_targets(torch.zeros(4), 1).shape == (4, 1)
    with pytest.raises(ValueError):
        lik.check_targets(torch.zeros(4), 2)


def test_outputs_and_predictions_per_likelihood():
    with pytest.raises(ValueError, match="at least 2"):
        ClassificationLikelihood().check_outputs(torch.zeros(3, 1))
    RewardModelingLikelihood().check_outputs(torch.zeros(3, 1))
    assert RewardModelingLikelihood().n_outputs(torch.zeros(3, 2)) == 1
    assert ClassificationLikelihood().n_outputs(torch.zeros(3, 5)) == 5
    assert RewardModelingLikelihood().predicts_classes(fitting=True)
    assert not RewardModelingLikelihood().predicts_classes(fitting=False)
    assert ClassificationLikelihood().predicts_classes()
    assert not RegressionLikelihood().predicts_classes(fitting=True)
    assert RewardModelingLikelihood().scoring_kwargs() == {"fitting": True}
    assert RegressionLikelihood().has_noise
    assert not ClassificationLikelihood().has_noise
