"""ELLA (Nystrom features) and VaLLA (variational sparse GP) against dense
linearised-Laplace ground truth built with torch.func in float64, their
objectives against closed forms / quadrature, checkpoints and misuse."""

import io
import math

import numpy as np
import pytest
import torch
from ground_truth import (
    dense_ggn,
    dense_jacobians,
    output_hessians,
    tiny_data,
    tiny_net,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace.functional import ELLA, VaLLA
from laplace.functional.alpha_energy import (
    categorical_energy,
    gaussian_energy,
    inducing_kl,
)
from laplace.functional.inducing import kmeans
from laplace.functional.sparse_gp import pack_lower
from laplace.utils.subsets import balanced_indices, random_subset_indices

RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [("regression", 1), ("regression", 2), ("classification", 3)]


# ---- ELLA ------------------------------------------------------------------------------


def _ella(likelihood, n_out, n=32, k=None, **kwargs):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, n)
    sigma = 0.6 if likelihood == "regression" else 1.0
    n_params = sum(p.numel() for p in model.parameters())
    la = ELLA(
        model,
        likelihood,
        subsample_size=n,
        n_eigenvalues=k or n_params,
        sigma_noise=sigma,
        prior_precision=0.8,
        temperature=0.9,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    return la, model, X, y, 1 / (sigma**2 * 0.9)


@pytest.mark.parametrize("likelihood,n_out", CASES)
def test_ella_with_all_eigenpairs_is_exact_linearised_laplace(likelihood, n_out):
    la, model, X, y, c = _ella(likelihood, n_out, nystrom_outputs="all")
    P = c * dense_ggn(model, X, likelihood) + 0.8 * torch.eye(la.n_params)
    assert la.dual_directions.shape == (la.n_params, la.n_params)
    X_test = torch.randn(5, 2, generator=torch.Generator().manual_seed(7))
    Jt = dense_jacobians(model, X_test)
    f_var = Jt @ torch.linalg.solve(P, Jt.mT)
    f_mu, var = la.predictive_moments(X_test)
    torch.testing.assert_close(f_mu, model(X_test).detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(var, f_var, rtol=RTOL, atol=1e-12)
    Jflat = Jt.reshape(-1, la.n_params)
    _, joint = la.predictive_moments(X_test, joint=True)
    torch.testing.assert_close(
        joint, Jflat @ torch.linalg.solve(P, Jflat.T), rtol=RTOL, atol=1e-12
    )
    # the Jacobian-vector-product features equal J V
    torch.testing.assert_close(la.functional_variance(Jt), var, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(
        la.functional_covariance(Jt), joint, rtol=RTOL, atol=1e-12
    )
    if likelihood == "classification":
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(
            la(X_test), torch.softmax(kappa * f_mu, -1), rtol=RTOL, atol=0
        )


@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
def test_ella_truncated_matches_dense_nystrom(likelihood, n_out):
    k, m = 6, 10
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, 30)
    la = ELLA(
        model,
        likelihood,
        subsample_size=m,
        n_eigenvalues=k,
        prior_precision=0.5,
        seed=11,
        nystrom_outputs="all",
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))
    Js = dense_jacobians(model, X[random_subset_indices(30, m, 11)]).reshape(
        m * n_out, -1
    )
    evals, evecs = torch.linalg.eigh(Js @ Js.T)
    V = Js.T @ (evecs[:, -k:] / evals[-k:].sqrt())
    V_la = la.dual_directions
    torch.testing.assert_close(V_la.T @ V_la, torch.eye(k), rtol=0, atol=1e-10)
    torch.testing.assert_close(V_la @ V_la.T, V @ V.T, rtol=0, atol=1e-10)
    H = dense_ggn(model, X, likelihood)
    torch.testing.assert_close(
        la.feature_gram, V_la.T @ H @ V_la, rtol=RTOL, atol=1e-12
    )
    X_test = torch.randn(4, 2)
    phi = dense_jacobians(model, X_test) @ V
    cov = phi @ torch.linalg.solve(V.T @ H @ V + 0.5 * torch.eye(k), phi.mT)
    torch.testing.assert_close(
        la.predictive_moments(X_test)[1], cov, rtol=RTOL, atol=1e-12
    )


def test_ella_balanced_subsample():
    model = tiny_net(3)
    X, y = tiny_data("classification", 3, 30)
    y = torch.tensor([0] * 20 + [1] * 5 + [2] * 5)[torch.randperm(30)]  # unbalanced
    la = ELLA(
        model,
        "classification",
        subsample_size=9,
        n_eigenvalues=5,
        seed=2,
        nystrom_outputs="all",
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True), balanced=True)
    idx = balanced_indices(y, 9, 2)
    assert torch.bincount(y[idx], minlength=3).tolist() == [3, 3, 3]
    Js = dense_jacobians(model, X[idx]).reshape(27, -1)
    evals, evecs = torch.linalg.eigh(Js @ Js.T)
    V = Js.T @ (evecs[:, -5:] / evals[-5:].sqrt())
    V_la = la.dual_directions
    torch.testing.assert_close(V_la @ V_la.T, V @ V.T, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="balanced"):
        ELLA(model, "regression", 5, 2).fit(
            DataLoader(TensorDataset(X, torch.randn(30, 3)), batch_size=8),
            balanced=True,
        )


def test_ella_early_stopping_and_tuning():
    model = tiny_net(1)
    X, y = tiny_data("regression", 1, 32)
    X_val, y_val = tiny_data("regression", 1, 12, seed=4)
    val = DataLoader(TensorDataset(X_val, y_val), batch_size=6)
    la = ELLA(
        model, "regression", subsample_size=8, n_eigenvalues=4, prior_precision=0.1
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8), val_loader=val, val_steps=1)
    hist = la.fit_history_
    assert hist["processed_examples"] == [8, 16, 24, 32]
    best = int(np.argmin(hist["val_nll"]))
    assert la.n_data == hist["processed_examples"][best]
    V = la.dual_directions
    n = la.n_data
    H = dense_ggn(model, X[:n], "regression")
    torch.testing.assert_close(la.feature_gram, V.T @ H @ V, rtol=RTOL, atol=1e-12)
    assert la._validation_nll(val) == pytest.approx(hist["val_nll"][best], rel=1e-12)

    best_entry = la.optimize_hyperparameters(val, [0.1, (1.0, 0.5), (10.0, 2.0)])
    assert len(hist["tuning"]) == 3
    for rec in hist["tuning"]:
        la.prior_precision, la.sigma_noise = rec["prior_precision"], rec["sigma_noise"]
        mean, var = la(X_val)
        sd = (var.squeeze(-1) + rec["sigma_noise"] ** 2).sqrt()
        nll = -torch.distributions.Normal(mean, sd).log_prob(y_val).mean()
        assert rec["val_nll"] == pytest.approx(float(nll), rel=1e-10)
    winner = min(hist["tuning"], key=lambda r: r["val_nll"])
    assert best_entry == winner
    once = ELLA(model, "regression", subsample_size=8, n_eigenvalues=4)
    once.fit(DataLoader(TensorDataset(X, y), batch_size=8), val_loader=val)
    assert once.fit_history_["processed_examples"] == [32]  # only after the last batch
    la.optimize_hyperparameters(val, [best_entry["prior_precision"]])
    assert float(la.prior_precision) == pytest.approx(best_entry["prior_precision"])
    la.optimize_prior_precision(val_loader=val, grid_size=5)
    assert float(la.prior_precision) in [
        pytest.approx(float(g)) for g in torch.logspace(-4, 4, 5)
    ]
    with pytest.raises(NotImplementedError, match="gridsearch"):
        la.optimize_prior_precision(method="marglik")
    with pytest.raises(NotImplementedError):
        la.log_marginal_likelihood()


def test_ella_state_dict_round_trip():
    la, model, X, _, _ = _ella("classification", 3, n=24, k=10)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    new = ELLA(model, "classification", 24, 10, temperature=0.9, prior_precision=5.0)
    new.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(new(X[:5]), la(X[:5]), rtol=1e-12, atol=0)
    assert new.fit_history_ == la.fit_history_
    with pytest.raises(ValueError, match="n_eigenvalues"):
        ELLA(model, "classification", 24, 9).load_state_dict(la.state_dict())
    with pytest.raises(ValueError, match="fingerprint"):
        ELLA(tiny_net(3, seed=9), "classification", 24, 10).load_state_dict(
            la.state_dict()
        )


def test_ella_misuse():
    model = tiny_net(2)
    with pytest.raises(ValueError, match="n_eigenvalues=6 must not exceed"):
        ELLA(model, "regression", subsample_size=5, n_eigenvalues=6)
    with pytest.raises(ValueError, match="scalar"):
        ELLA(model, "regression", 5, 2, prior_precision=torch.ones(3))
    with pytest.raises(ValueError, match="prior_mean=0"):
        ELLA(model, "regression", 5, 2, prior_mean=0.3)
    with pytest.raises(ValueError, match="exceeds"):
        ELLA(model, "regression", 50, 2).fit(
            DataLoader(TensorDataset(*tiny_data("regression", 2, 10)), batch_size=5)
        )
    la, *_ = _ella("regression", 1, n=16, k=4)
    with pytest.raises(ValueError, match="pred_type='gp'"):
        la(torch.randn(2, 2), pred_type="nn")
    with pytest.warns(UserWarning, match="numerically non-zero"):
        # rank of the Gram matrix of 2 points and one output is 2
        ELLA(tiny_net(1), "regression", 2, 2).fit(
            DataLoader(
                TensorDataset(torch.zeros(6, 2), torch.randn(6, 1)), batch_size=3
            )
        )


# ---- VaLLA -----------------------------------------------------------------------------


def _optimal_valla(likelihood, n_out, alpha=1.0, n=6):
    """VaLLA with Z = X and S set to the exact posterior of the inducing outputs,
    (K^{-1} + c Lambda)^{-1}, for the prior precision and noise it holds."""
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, n)
    sigma = 0.7 if likelihood == "regression" else 1.0
    la = VaLLA(
        model,
        likelihood,
        X,
        alpha=alpha,
        prior_precision=0.9,
        sigma_noise=sigma,
        mc_softmax_samples=0 if alpha == 1 else 4,
    )
    loader = DataLoader(TensorDataset(X, y), batch_size=n)
    la.fit(loader, iterations=1, lr=1e-12)
    la.prior_precision, la.sigma_noise = 0.9, sigma
    J = dense_jacobians(model, X).reshape(n * n_out, -1)
    lam = torch.block_diag(*output_hessians(model(X).detach(), likelihood))
    K = J @ J.T / 0.9
    S = torch.linalg.inv(torch.linalg.inv(K) + lam / sigma**2)
    # whitened factor: S = C L L^T C^T with C = chol(J J^T)
    C = torch.linalg.cholesky(J @ J.T)
    la.L = pack_lower(
        torch.linalg.solve_triangular(C, torch.linalg.cholesky(S), upper=False)
    )
    return la, model, X, y, sigma


@pytest.mark.parametrize("likelihood,n_out", CASES)
def test_valla_at_optimal_covariance_is_exact_linearised_laplace(likelihood, n_out):
    la, model, X, y, sigma = _optimal_valla(likelihood, n_out)
    P = dense_ggn(model, X, likelihood) / sigma**2 + 0.9 * torch.eye(la.n_params)
    X_test = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    Jt = dense_jacobians(model, X_test)
    mean, var = la.predictive_moments(X_test)
    torch.testing.assert_close(mean, model(X_test).detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(
        var, Jt @ torch.linalg.solve(P, Jt.mT), rtol=RTOL, atol=1e-12
    )
    Jflat = Jt.reshape(-1, la.n_params)
    torch.testing.assert_close(
        la.predictive_moments(X_test, joint=True)[1],
        Jflat @ torch.linalg.solve(P, Jflat.T),
        rtol=RTOL,
        atol=1e-12,
    )


def test_valla_elbo_is_stationary_at_linearised_laplace():
    """alpha = 0, Gaussian likelihood, Z = X: the ELBO's optimal S is the exact
    (linearised Laplace) posterior, so its gradient in L vanishes there."""
    la, model, X, y, sigma = _optimal_valla("regression", 2, alpha=0.0)
    log_delta = torch.tensor(math.log(0.9))
    log_var = torch.tensor(2 * math.log(sigma))
    grads = []
    for packed in (la.L, la.L * 1.05):
        packed = packed.clone().requires_grad_(True)
        obj = la.objective(X, y, packed, log_delta, log_var)
        grads.append(torch.autograd.grad(obj, packed)[0])
    assert grads[0].norm() < 1e-8 * grads[1].norm()


def test_valla_training_approaches_linearised_laplace():
    """alpha = 0, Z = X, full batch: Adam on the ELBO approaches its optimum in S,
    the exact linearised Laplace at the learned prior precision and noise. The
    learned prior precision still drifts after 300 constant-step Adam steps and S
    lags behind it (0.5% here), hence rtol 0.03; the prior at the learned
    precision (S = K_ZZ) is off by 15-20% (checked below)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    X, y = tiny_data("regression", 1, 12)
    la = VaLLA(model, "regression", X, alpha=0.0, prior_precision=0.9, sigma_noise=0.7)
    X_test = X[:5] + 0.1  # near the data, where the posterior differs from the prior
    la.fit(DataLoader(TensorDataset(X, y), batch_size=12), iterations=300, lr=0.02)
    hist = la.fit_history_["objective"]
    assert len(hist) == 300 and hist[-1] < hist[0]  # the minimised loss
    delta, sigma = float(la.prior_precision), float(la.sigma_noise)
    assert delta != 0.9 and sigma != 0.7  # both were learned
    P = dense_ggn(model, X, "regression") / sigma**2 + delta * torch.eye(la.n_params)
    Jt = dense_jacobians(model, X_test)
    exact = Jt @ torch.linalg.solve(P, Jt.mT)
    torch.testing.assert_close(la(X_test)[1], exact, rtol=0.03, atol=0)
    prior = Jt @ Jt.mT / delta
    assert ((prior - exact) / exact).abs().min() > 0.1


def test_valla_classification_fits_and_is_reproducible():
    model = tiny_net(3)
    X, y = tiny_data("classification", 3, 24)
    loader = DataLoader(TensorDataset(X, y), batch_size=7, shuffle=False)  # uneven
    val = DataLoader(
        TensorDataset(*tiny_data("classification", 3, 6, seed=3)), batch_size=6
    )
    runs = []
    for _ in range(2):
        la = VaLLA(
            model,
            "classification",
            "random",
            num_inducing=4,
            alpha=0.5,
            mc_softmax_samples=8,
            seed=3,
        )
        la.fit(loader, iterations=12, lr=1e-2, val_loader=val, val_steps=5)
        runs.append(la)
    assert len(runs[0].fit_history_["val_nll"]) == 3  # steps 5, 10 and the last
    assert runs[0].fit_history_ == runs[1].fit_history_
    torch.testing.assert_close(runs[0].L, runs[1].L, rtol=0, atol=0)
    torch.testing.assert_close(
        runs[0]._inducing_inputs, X[random_subset_indices(24, 4, 3)]
    )
    assert float(runs[0].sigma_noise) == 1.0
    probs = runs[0](X[:5])
    torch.testing.assert_close(probs.sum(-1), torch.ones(5), rtol=1e-12, atol=1e-12)
    runs[0].fit(loader, iterations=3, lr=1e-2, override=False)
    assert len(runs[0].fit_history_["objective"]) == 15


def test_valla_uncached_minibatches_match_cached(monkeypatch):
    """Large data sets skip the cache of kernel terms and use the loader's
    batches; with one full batch both give the same fit (up to summation order)."""
    import laplace.functional.valla_training as valla_module

    model = tiny_net(2)
    X, y = tiny_data("regression", 2, 10)
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    fits = []
    for budget in (valla_module.CACHE_ELEMENTS, 0):
        monkeypatch.setattr(valla_module, "CACHE_ELEMENTS", budget)
        la = VaLLA(model, "regression", X[:3], alpha=0.5)
        la.fit(loader, iterations=5, lr=1e-2)
        fits.append(la)
    torch.testing.assert_close(fits[0].L, fits[1].L, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(
        fits[0].sigma_noise, fits[1].sigma_noise, rtol=1e-8, atol=0
    )


def test_valla_inducing_choices():
    model = tiny_net(3)
    X, y = tiny_data("classification", 3, 40)
    loader = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True)
    la = VaLLA(
        model,
        "classification",
        "kmeans",
        num_inducing=5,
        inducing_classes=torch.tensor([0, 1, 2, 0, 1]),
    )
    la.fit(loader, iterations=2)
    Z = la._inducing_inputs
    assign = torch.cdist(X, Z).argmin(1)
    for j in range(5):  # Lloyd fixed point: every centre is its cluster's mean
        torch.testing.assert_close(Z[j], X[assign == j].mean(0), rtol=1e-12, atol=1e-12)
    assert la._J_Z.shape == (5, la.n_params) and la.L.shape == (15,)
    var = la.predictive_moments(X[:4])[1]
    assert (torch.linalg.eigvalsh(var) > -1e-12).all()
    torch.testing.assert_close(kmeans(X, 5, seed=0), Z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inducing_classes must hold"):
        VaLLA(
            model, "classification", X[:3], inducing_classes=torch.tensor([0, 5, 1])
        ).fit(loader, iterations=1)
    with pytest.raises(ValueError, match="num_inducing=4 disagrees"):
        VaLLA(model, "classification", X[:3], num_inducing=4).fit(loader, iterations=1)


def test_valla_state_dict_round_trip():
    model = tiny_net(2)
    X, y = tiny_data("regression", 2, 12)
    la = VaLLA(model, "regression", "random", num_inducing=3, alpha=0.3)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6), iterations=5, lr=1e-2)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    new = VaLLA(model, "regression", "random", num_inducing=3, alpha=0.3)
    new.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(new(X[:4]), la(X[:4])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    torch.testing.assert_close(new.log_noise_variance, la.log_noise_variance)
    torch.testing.assert_close(new.log_prior_precision, la.log_prior_precision)
    assert new.fit_history_ == la.fit_history_
    with pytest.raises(ValueError, match="alpha"):
        VaLLA(model, "regression", "random", num_inducing=3).load_state_dict(
            la.state_dict()
        )


def test_valla_misuse():
    model = tiny_net(3)
    for alpha in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="alpha"):
            VaLLA(model, "regression", "random", num_inducing=2, alpha=alpha)
    with pytest.raises(ValueError, match="mc_softmax_samples > 0"):
        VaLLA(model, "classification", "random", num_inducing=2, alpha=0.5)
    with pytest.raises(ValueError, match="mc_softmax_samples must"):
        VaLLA(model, "classification", "random", num_inducing=2, mc_softmax_samples=-1)
    with pytest.raises(ValueError, match="num_inducing"):
        VaLLA(model, "regression", "random")
    with pytest.raises(ValueError, match="Invalid inducing_locations='grid'"):
        VaLLA(model, "regression", "grid", num_inducing=3)
    with pytest.raises(ValueError, match="inducing_classes"):
        VaLLA(
            model, "classification", torch.randn(3, 2), inducing_classes=torch.ones(3)
        )
    with pytest.raises(ValueError, match="prior_mean=0"):
        VaLLA(model, "regression", torch.randn(3, 2), prior_mean=1.0)
    la = VaLLA(model, "classification", torch.randn(3, 2))
    with pytest.raises(NotImplementedError):
        la.optimize_prior_precision()
    with pytest.raises(NotImplementedError):
        la.log_marginal_likelihood()


# ---- objective pieces ---------------------------------------------------------------------


def test_gaussian_energy_against_closed_forms_and_quadrature():
    gen = torch.Generator().manual_seed(0)
    y, mean = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    B = torch.randn(4, 2, 2, generator=gen)
    cov = B @ B.mT
    s = torch.tensor(0.3)
    exact = torch.distributions.MultivariateNormal(mean, cov + s * torch.eye(2))
    torch.testing.assert_close(
        gaussian_energy(y, mean, cov, s, 1.0),
        exact.log_prob(y).sum(),
        rtol=1e-12,
        atol=0,
    )
    elbo = (
        -0.5
        * (
            2 * torch.log(2 * math.pi * s)
            + ((y - mean).square().sum(-1) + cov.diagonal(dim1=1, dim2=2).sum(-1)) / s
        ).sum()
    )
    torch.testing.assert_close(
        gaussian_energy(y, mean, cov, s, 0.0), elbo, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        gaussian_energy(y, mean, cov, s, 1e-7), elbo, rtol=1e-5, atol=0
    )
    # alpha = 0.4, one output: (1/alpha) log int N(y|f,s)^alpha N(f|m,v) df on a grid
    m, v, t, a = 0.3, 0.5, 1.1, 0.4
    f = torch.linspace(m - 12 * v**0.5, m + 12 * v**0.5, 200001)
    integrand = torch.distributions.Normal(f, s.sqrt()).log_prob(torch.tensor(t)) * a
    integrand = (integrand + torch.distributions.Normal(m, v**0.5).log_prob(f)).exp()
    quad = torch.trapezoid(integrand, f).log() / a
    got = gaussian_energy(
        torch.tensor([[t]]), torch.tensor([[m]]), torch.tensor([[[v]]]), s, a
    )
    torch.testing.assert_close(got, quad, rtol=1e-8, atol=0)


def test_categorical_energy_against_gauss_hermite():
    mean = torch.tensor([[0.4, -0.2], [1.0, 0.5]])
    cov = torch.tensor([[[0.8, 0.3], [0.3, 0.5]], [[0.2, -0.1], [-0.1, 0.6]]])
    y = torch.tensor([0, 1])
    nodes, weights = np.polynomial.hermite.hermgauss(60)
    z = torch.tensor(nodes) * math.sqrt(2)
    w = torch.tensor(weights) / math.sqrt(math.pi)
    zz = torch.stack(torch.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)
    ww = (w[:, None] * w[None, :]).reshape(-1)
    n = 200000
    for alpha in (0.0, 0.5, 1.0):
        total = 0.0
        for i in range(2):
            logits = mean[i] + zz @ torch.linalg.cholesky(cov[i]).T
            logp = torch.log_softmax(logits, -1)[:, y[i]]
            total += (
                (ww * logp).sum()
                if alpha == 0
                else ((ww * (alpha * logp).exp()).sum().log() / alpha)
            )
        mc = categorical_energy(
            y, mean, cov, alpha, n, torch.Generator().manual_seed(0)
        )
        # Monte Carlo with 2e5 draws: standard error well below 5e-3 here
        assert abs(float(mc) - float(total)) < 5e-3
    probit = categorical_energy(y, mean, cov, 1.0, 0)
    kappa = torch.rsqrt(1 + math.pi / 8 * cov.diagonal(dim1=1, dim2=2))
    expected = torch.log_softmax(kappa * mean, -1).gather(1, y[:, None]).sum()
    torch.testing.assert_close(probit, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="alpha=1"):
        categorical_energy(y, mean, cov, 0.5, 0)


def test_inducing_kl_against_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    C = torch.linalg.cholesky(
        torch.cov(torch.randn(4, 9, generator=gen)) + torch.eye(4)
    )
    L = torch.tril(torch.randn(4, 4, generator=gen)) + 2 * torch.eye(4)
    L = L * torch.tensor([1.0, -1.0, 1.0, -1.0])  # the diagonal's signs are free
    delta = torch.tensor(2.5)
    expected = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(torch.zeros(4), C @ L @ L.T @ C.T),
        torch.distributions.MultivariateNormal(torch.zeros(4), C @ C.T / delta),
    )
    torch.testing.assert_close(inducing_kl(L, delta), expected, rtol=1e-10, atol=0)


def test_reward_modeling_fits_pairs_and_predicts_rewards():
    """Fit on pairs (batch, 2, dim) as classification, predict one reward per input
    as regression; ELLA with all eigenpairs is the exact linearised Laplace."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1), nn.Flatten()
    ).double()
    pairs = torch.randn(20, 2, 3, generator=torch.Generator().manual_seed(1))
    y = torch.randint(2, (20,), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(pairs, y), batch_size=5)
    la = ELLA(model, "reward_modeling", subsample_size=20, n_eigenvalues=11)
    la.fit(loader)
    P = dense_ggn(model, pairs, "classification") + torch.eye(11)
    x = torch.randn(4, 3)
    Jt = dense_jacobians(model, x)
    mean, var = la(x)
    torch.testing.assert_close(mean, model(x).detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(
        var, Jt @ torch.linalg.solve(P, Jt.mT), rtol=RTOL, atol=1e-12
    )
    probs = la(pairs[:3], fitting=True)
    assert probs.shape == (3, 2)
    valla = VaLLA(model, "reward_modeling", "random", num_inducing=3)
    valla.fit(loader, iterations=3)
    assert valla(x)[1].shape == (4, 1, 1)
