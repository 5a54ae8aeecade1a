"""Weight-space Laplace on tiny nonlinear nets against dense torch.func ground
truth in float64: posterior precision, marginal likelihood, GLM predictive,
link approximations and sampling."""

import math

import pytest
import torch
from ground_truth import dense_ggn, dense_jacobians, tiny_data, tiny_net
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

RTOL = 1e-7


CASES = [
    ("classification", 3),
    ("regression", 1),
    ("regression", 2),
]


@pytest.mark.parametrize("likelihood,n_out", CASES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_posterior_and_glm_against_dense(likelihood, n_out, subset, structure):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out)
    sigma = 1.0 if likelihood == "classification" else 0.6
    prior = 0.8
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        sigma_noise=sigma,
        prior_precision=prior,
        temperature=0.9,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    ggn = dense_ggn(model, X, likelihood, last_layer=subset == "last_layer")
    P = ggn / (sigma**2 * 0.9) + prior * torch.eye(len(ggn))
    if structure == "diag":
        P = torch.diag(P.diagonal())
        torch.testing.assert_close(
            la.posterior_precision, P.diagonal(), rtol=RTOL, atol=1e-12
        )
    else:
        torch.testing.assert_close(la.posterior_precision, P, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(
        la.log_det_posterior_precision, torch.linalg.slogdet(P)[1], rtol=RTOL, atol=0
    )
    # log likelihood at the MAP, tempered
    f = model(X).detach()
    if likelihood == "classification":
        loglik = -nn.functional.cross_entropy(f, y, reduction="sum") / 0.9
    else:
        loglik = -0.5 * (f - y).square().sum() / (sigma**2 * 0.9) - len(
            X
        ) * n_out * math.log(sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(la.log_likelihood, loglik, rtol=RTOL, atol=0)

    X_test = torch.randn(5, 2, dtype=torch.float64)
    J = dense_jacobians(model, X_test, last_layer=subset == "last_layer")
    f_var = J @ torch.linalg.solve(P, J.transpose(1, 2))
    f_mu = model(X_test).detach()
    if likelihood == "regression":
        mean, var = la(X_test)
        torch.testing.assert_close(mean, f_mu, rtol=RTOL, atol=0)
        torch.testing.assert_close(var, f_var, rtol=RTOL, atol=1e-12)
    else:
        kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(
            la(X_test, link_approx="probit"),
            torch.softmax(kappa * f_mu, -1),
            rtol=RTOL,
            atol=0,
        )
        # MC link with a fixed generator: reproducible and an unbiased estimate
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        p1 = la(X_test, link_approx="mc", n_samples=20000, generator=g1)
        p2 = la(X_test, link_approx="mc", n_samples=20000, generator=g2)
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
        eps = torch.randn(20000, 5, n_out, generator=torch.Generator().manual_seed(9))
        ref = torch.softmax(
            f_mu + (torch.linalg.cholesky(f_var) @ eps.unsqueeze(-1)).squeeze(-1), -1
        ).mean(0)
        # two independent 20k-sample MC estimates: agree to a few std errors
        torch.testing.assert_close(p1, ref, rtol=0, atol=1e-2)
        for link in ("bridge", "bridge_norm"):
            p = la(X_test, link_approx=link)
            assert p.shape == (5, n_out)
            torch.testing.assert_close(p.sum(-1), torch.ones(5), rtol=1e-12, atol=1e-12)


def test_kron_posterior_matches_kfac_dense():
    """Kron LA precision equals the dense KFAC matrix built independently with
    torch.kron from per-layer input and output-gradient covariances."""
    model = tiny_net(1)
    X, y = tiny_data("regression", 1)
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="kron",
        prior_precision=0.5,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    # dense KFAC: per layer A = mean(a a^T), G = sum(g g^T) with g = df/ds (1 output)
    h = torch.tanh(model[0](X)).detach()
    s_grad_2 = model[2].weight.detach().expand(len(X), -1)  # d f / d s2 = 1, so g2 = 1
    g1 = s_grad_2 * (1 - h.square())  # d f / d s1
    blocks = []
    for a, g in ((X, g1), (h, torch.ones(len(X), 1))):
        A = a.T @ a / len(X)
        G = g.T @ g
        blocks += [torch.kron(G, A), G]
    expected = torch.block_diag(*blocks) + 0.5 * torch.eye(la.n_params)
    torch.testing.assert_close(
        la.posterior_precision.to_matrix(), expected, rtol=RTOL, atol=1e-12
    )


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_weight_samples_have_posterior_covariance(structure, subset):
    model = tiny_net(2)
    X, y = tiny_data("classification", 2)
    la = Laplace(
        model,
        "classification",
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=2.0,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    gen = torch.Generator().manual_seed(0)
    samples = la.sample(200000, generator=gen)
    assert samples.shape == (200000, la.n_params)
    P = la.posterior_precision
    dense_P = P if isinstance(P, torch.Tensor) else P.to_matrix()
    if dense_P.ndim == 1:
        dense_P = torch.diag(dense_P)
    cov = torch.linalg.inv(dense_P)
    # Monte Carlo with 2e5 samples: standard error of a covariance entry is about
    # sqrt(2/2e5) * var ~ 3e-3 * var; allow 5 standard errors
    torch.testing.assert_close(
        samples.mean(0),
        la.mean,
        rtol=0,
        atol=5 * 3e-3 * cov.diagonal().max().sqrt().item(),
    )
    emp = torch.cov(samples.T)
    torch.testing.assert_close(
        emp, cov, rtol=0, atol=5 * 3e-3 * cov.diagonal().max().item()
    )
    same = la.sample(10, generator=torch.Generator().manual_seed(5))
    again = la.sample(10, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(same, again, rtol=0, atol=0)


@pytest.mark.parametrize("likelihood,n_out", CASES)
def test_nn_predictive_uses_weight_samples(likelihood, n_out):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="full",
        prior_precision=3.0,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    X_test = torch.randn(4, 2, dtype=torch.float64)
    thetas = la.sample(50, generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters()]
    outs = []
    for theta in thetas:
        chunks = torch.split(theta, [p.numel() for p in model.parameters()])
        params = {n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters())}
        outs.append(functional_call(model, params, (X_test,)))
    outs = torch.stack(outs).detach()
    out = la(
        X_test,
        pred_type="nn",
        link_approx="mc",
        n_samples=50,
        generator=torch.Generator().manual_seed(1),
    )
    if likelihood == "classification":
        torch.testing.assert_close(
            out, torch.softmax(outs, -1).mean(0), rtol=RTOL, atol=0
        )
    else:
        torch.testing.assert_close(out[0], outs.mean(0), rtol=RTOL, atol=0)
        torch.testing.assert_close(out[1], outs.var(0), rtol=RTOL, atol=0)
    fs = la.functional_samples(
        X_test, pred_type="nn", n_samples=50, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(fs, outs, rtol=RTOL, atol=0)
    # the user's model is untouched by sampling
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in model.parameters()]), la.mean, rtol=0, atol=0
    )


def test_glm_functional_samples_moments():
    model = tiny_net(2)
    X, y = tiny_data("regression", 2)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    X_test = torch.randn(3, 2, dtype=torch.float64)
    f_mu, f_var = la(X_test)
    fs = la.functional_samples(
        X_test, n_samples=100000, generator=torch.Generator().manual_seed(0)
    )
    assert fs.shape == (100000, 3, 2)
    scale = f_var.diagonal(dim1=1, dim2=2).max().item()
    torch.testing.assert_close(
        fs.mean(0), f_mu, rtol=0, atol=5 * math.sqrt(scale / 1e5)
    )
    emp = torch.einsum("sbi,sbj->bij", fs - f_mu, fs - f_mu) / 1e5
    torch.testing.assert_close(emp, f_var, rtol=0, atol=5 * scale * math.sqrt(2 / 1e5))
