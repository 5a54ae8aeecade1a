"""Bayesian linear regression: the Laplace approximation is exact.

For ``f(x) = W x + b`` with Gaussian likelihood and prior, the posterior is Gaussian
with precision ``Phi^T Phi / sigma^2 + alpha I`` and the evidence is
``N(y; 0, sigma^2 I + Phi Phi^T / alpha)``. Both are computed here in closed form,
independently of the library, and compared in float64.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import DiagLaplace, FullLaplace, FullLLLaplace, KronLaplace, Laplace

N, D = 40, 3
RTOL = 1e-8


def design(X, bias=True):
    return torch.cat([X, torch.ones(len(X), 1)], 1) if bias else X


def blr_problem(bias=True, seed=0, alpha=0.7, sigma=0.4):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 * torch.randn(
        N, 1, generator=gen, dtype=torch.float64
    )
    Phi = design(X, bias)
    P = Phi.T @ Phi / sigma**2 + alpha * torch.eye(Phi.shape[1])
    theta = torch.linalg.solve(P, Phi.T @ y / sigma**2).squeeze(-1)
    model = nn.Linear(D, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(theta[:D].reshape(1, D))
        if bias:
            model.bias.copy_(theta[D:])
    return model, X, y, Phi, P, alpha, sigma


def log_evidence(Phi, y, alpha, sigma):
    cov = sigma**2 * torch.eye(len(y)) + Phi @ Phi.T / alpha
    return torch.distributions.MultivariateNormal(
        torch.zeros(len(y)), covariance_matrix=cov
    ).log_prob(y.squeeze(-1))


def fitted(cls_or_key, model, X, y, alpha, sigma, batch_size=16, **kw):
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size)
    if isinstance(cls_or_key, tuple):
        la = Laplace(
            model,
            "regression",
            *cls_or_key,
            sigma_noise=sigma,
            prior_precision=alpha,
            **kw,
        )
    else:
        la = cls_or_key(
            model, "regression", sigma_noise=sigma, prior_precision=alpha, **kw
        )
    la.fit(loader)
    return la


EXACT = [
    (("all", "full"), True),
    (("last_layer", "full"), True),
    (("all", "kron"), False),  # KFAC is exact for one output and no bias
    (("last_layer", "kron"), False),
]


@pytest.mark.parametrize("key,bias", EXACT)
def test_posterior_precision_exact(key, bias):
    model, X, y, Phi, P, alpha, sigma = blr_problem(bias)
    la = fitted(key, model, X, y, alpha, sigma)
    P_la = la.posterior_precision
    P_la = P_la if isinstance(P_la, torch.Tensor) else P_la.to_matrix()
    torch.testing.assert_close(P_la, P, rtol=RTOL, atol=1e-10)


@pytest.mark.parametrize("key,bias", EXACT)
def test_log_marginal_likelihood_exact(key, bias):
    model, X, y, Phi, P, alpha, sigma = blr_problem(bias)
    la = fitted(key, model, X, y, alpha, sigma)
    expected = log_evidence(Phi, y, alpha, sigma)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), expected, rtol=RTOL, atol=0
    )


@pytest.mark.parametrize("key,bias", EXACT)
def test_glm_predictive_exact(key, bias):
    model, X, y, Phi, P, alpha, sigma = blr_problem(bias)
    la = fitted(key, model, X, y, alpha, sigma)
    X_test = torch.randn(7, D, dtype=torch.float64)
    Phi_test = design(X_test, bias)
    f_mu, f_var = la(X_test)
    torch.testing.assert_close(f_mu, model(X_test).detach(), rtol=RTOL, atol=0)
    expected_var = (Phi_test @ torch.linalg.solve(P, Phi_test.T)).diagonal()
    torch.testing.assert_close(f_var.reshape(-1), expected_var, rtol=RTOL, atol=0)
    f_mu_j, f_cov_j = la(X_test, joint=True)
    torch.testing.assert_close(
        f_cov_j, Phi_test @ torch.linalg.solve(P, Phi_test.T), rtol=RTOL, atol=1e-12
    )
    _, f_var_d = la(X_test, diagonal_output=True)
    assert f_var_d.shape == (7, 1)
    torch.testing.assert_close(f_var_d.reshape(-1), expected_var, rtol=RTOL, atol=0)


def test_diag_laplace_matches_diagonal_of_exact_precision():
    model, X, y, Phi, P, alpha, sigma = blr_problem(True)
    la = fitted(DiagLaplace, model, X, y, alpha, sigma)
    torch.testing.assert_close(la.posterior_precision, P.diagonal(), rtol=RTOL, atol=0)
    logdet = P.diagonal().log().sum()
    scatter = alpha * la.mean.square().sum()
    resid = y - model(X).detach()
    loglik = -0.5 * resid.square().sum() / sigma**2 - N * math.log(
        sigma * math.sqrt(2 * math.pi)
    )
    expected = loglik - 0.5 * (logdet - P.shape[0] * math.log(alpha) + scatter)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), expected, rtol=RTOL, atol=0
    )


@pytest.mark.parametrize("cls", [FullLaplace, KronLaplace, DiagLaplace, FullLLLaplace])
def test_marglik_gradients_match_closed_form(cls):
    """d logML / d(prior precision, sigma) against autograd through the closed-form
    evidence (for Full) and against central finite differences (all)."""
    bias = cls is not KronLaplace
    model, X, y, Phi, P, alpha, sigma = blr_problem(bias)
    la = fitted(cls, model, X, y, alpha, sigma)

    def lml(log_alpha, log_sigma):
        return la.log_marginal_likelihood(log_alpha.exp(), log_sigma.exp())

    point = (torch.tensor(math.log(1.3)), torch.tensor(math.log(0.5)))
    args = [p.clone().requires_grad_(True) for p in point]
    grads = torch.autograd.grad(lml(*args), args)
    eps = 1e-6
    for i in range(2):
        plus = [p.clone() for p in point]
        minus = [p.clone() for p in point]
        plus[i] += eps
        minus[i] -= eps
        fd = (lml(*plus) - lml(*minus)) / (2 * eps)
        torch.testing.assert_close(grads[i], fd.detach(), rtol=1e-6, atol=1e-8)


def test_override_false_accumulates_like_one_fit():
    model, X, y, Phi, P, alpha, sigma = blr_problem(False)
    for cls in (FullLaplace, KronLaplace, DiagLaplace):
        la_all = fitted(cls, model, X, y, alpha, sigma)
        la = fitted(cls, model, X[:25], y[:25], alpha, sigma)
        la.fit(DataLoader(TensorDataset(X[25:], y[25:]), batch_size=8), override=False)
        assert la.n_data == N
        torch.testing.assert_close(
            la.log_marginal_likelihood(),
            la_all.log_marginal_likelihood(),
            rtol=RTOL,
            atol=0,
        )


def test_optimize_prior_precision_marglik_finds_evidence_maximum():
    model, X, y, Phi, P, alpha, sigma = blr_problem(True)
    la = fitted(FullLaplace, model, X, y, alpha, sigma)
    la.optimize_prior_precision(method="marglik", n_steps=300, lr=0.1)
    # the Laplace evidence is exact only at the MAP of the prior it was fitted
    # with, so compare with the maximiser of the Laplace evidence itself, found by
    # a fine grid over the closed-form expression log|P0| - log|P| - scatter
    grid = torch.logspace(-3, 3, 20001)
    H = Phi.T @ Phi / sigma**2
    evals = torch.linalg.eigvalsh(H)
    theta_sq = la.mean.square().sum()
    obj = (
        0.5 * len(evals) * grid.log()
        - 0.5 * (evals.unsqueeze(0) + grid.unsqueeze(1)).log().sum(1)
        - 0.5 * grid * theta_sq
    )
    best = grid[obj.argmax()]
    torch.testing.assert_close(la.prior_precision, best.reshape(1), rtol=2e-3, atol=0)
