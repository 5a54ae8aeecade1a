"""Subset-of-data GP Laplace (FunctionalLaplace, FunctionalLLLaplace) against dense
weight-space ground truth built with torch.func in float64, checkpoints and
misuse (the laplace.utils.functional_utils helpers: test_functional_utils.py)."""

import io
import math

import numpy as np
import pytest
import torch
from ground_truth import dense_jacobians, output_hessians, tiny_data, tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace, FullLLLaplace, Laplace
from laplace.approximation import NotFittedError
from laplace.curvature import CurvlinopsEF
from laplace.functional import (
    ELLA,
    FunctionalLaplace,
    FunctionalLLLaplace,
    VaLLA,
)

RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def data(likelihood, n_out, n=20, seed=1):
    return tiny_data(likelihood, n_out, n, seed)


def dense_posterior(model, X, likelihood, c, delta, last_layer=False):
    J = dense_jacobians(model, X, last_layer)
    lam = output_hessians(model(X).detach(), likelihood)
    H = torch.einsum("nop,noq,nqr->pr", J, lam, J)
    return c * H + delta * torch.eye(H.shape[0])


def loglik(model, X, y, likelihood, sigma, temperature):
    f = model(X).detach()
    if likelihood == "classification":
        return -nn.functional.cross_entropy(f, y, reduction="sum") / temperature
    sq = 0.5 * (f - y).square().sum() / (sigma**2 * temperature)
    return -sq - y.numel() * math.log(sigma * math.sqrt(2 * math.pi))


CASES = [("regression", 1), ("regression", 2), ("classification", 3)]


def _fit(cls_key, likelihood, n_out, n_subset=20, **kwargs):
    model = tiny_net(n_out)
    X, y = data(likelihood, n_out)
    sigma = 0.6 if likelihood == "regression" else 1.0
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=cls_key,
        hessian_structure="gp",
        n_subset=n_subset,
        sigma_noise=sigma,
        prior_precision=0.8,
        temperature=0.9,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    return la, model, X, y, sigma


@pytest.mark.parametrize("likelihood,n_out", CASES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_gp_view_equals_weight_space(likelihood, n_out, subset):
    """With n_subset = N: marglik pieces and GLM predictive of the GP view equal
    the dense weight-space ones (Woodbury / matrix determinant lemma)."""
    la, model, X, y, sigma = _fit(subset, likelihood, n_out)
    assert type(la) is (FunctionalLaplace if subset == "all" else FunctionalLLLaplace)
    ll = subset == "last_layer"
    c, delta = 1 / (sigma**2 * 0.9), 0.8
    P = dense_posterior(model, X, likelihood, c, delta, ll)
    theta = torch.cat([p.flatten() for p in (model[2] if ll else model).parameters()])
    log_det_ratio = torch.linalg.slogdet(P)[1] - len(P) * math.log(delta)
    scatter = delta * theta.detach().square().sum()
    lik = loglik(model, X, y, likelihood, sigma, 0.9)
    torch.testing.assert_close(la.log_det_ratio, log_det_ratio, rtol=RTOL, atol=0)
    torch.testing.assert_close(la.scatter, scatter, rtol=RTOL, atol=0)
    torch.testing.assert_close(la.log_likelihood, lik, rtol=RTOL, atol=0)
    marglik = lik - 0.5 * (log_det_ratio + scatter)
    torch.testing.assert_close(la.log_marginal_likelihood(), marglik, rtol=RTOL, atol=0)
    # and the weight-space class with the same backend agrees
    full = (FullLLLaplace if ll else FullLaplace)(
        model, likelihood, sigma_noise=sigma, prior_precision=0.8, temperature=0.9
    )
    full.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    torch.testing.assert_close(
        la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=RTOL, atol=0
    )

    X_test = torch.randn(5, 2, generator=torch.Generator().manual_seed(7))
    Jt = dense_jacobians(model, X_test, ll)
    f_var = Jt @ torch.linalg.solve(P, Jt.mT)
    f_mu = model(X_test).detach()
    if likelihood == "regression":
        mean, var = la(X_test)
        torch.testing.assert_close(mean, f_mu, rtol=RTOL, atol=0)
        torch.testing.assert_close(var, f_var, rtol=RTOL, atol=1e-12)
        _, diag = la(X_test, diagonal_output=True)
        torch.testing.assert_close(
            diag, f_var.diagonal(dim1=1, dim2=2), rtol=RTOL, atol=1e-12
        )
        mean, cov = la(X_test, joint=True)
        Jflat = Jt.reshape(-1, Jt.shape[-1])
        torch.testing.assert_close(mean, f_mu.flatten(), rtol=RTOL, atol=0)
        torch.testing.assert_close(
            cov, Jflat @ torch.linalg.solve(P, Jflat.T), rtol=RTOL, atol=1e-12
        )
    else:
        kappa = torch.rsqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        torch.testing.assert_close(
            la(X_test), torch.softmax(kappa * f_mu, -1), rtol=RTOL, atol=0
        )
        for link in ("bridge", "bridge_norm"):
            torch.testing.assert_close(
                la(X_test, link_approx=link),
                full(X_test, link_approx=link),
                rtol=RTOL,
                atol=1e-12,
            )


def test_marglik_gradients_match_weight_space():
    la, model, X, y, _ = _fit("all", "regression", 2)
    full = FullLaplace(
        model, "regression", sigma_noise=0.6, prior_precision=0.8, temperature=0.9
    )
    full.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    grads = []
    for obj in (la, full):
        prior = torch.tensor([0.7], requires_grad=True)
        sigma = torch.tensor(0.5, requires_grad=True)
        grads.append(
            torch.autograd.grad(
                obj.log_marginal_likelihood(prior, sigma), (prior, sigma)
            )
        )
    for g_gp, g_w in zip(*grads):
        torch.testing.assert_close(g_gp, g_w, rtol=RTOL, atol=0)


@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
def test_independent_outputs_is_one_gp_per_output(likelihood, n_out):
    la, model, X, y, sigma = _fit("all", likelihood, n_out, independent_outputs=True)
    c, delta = 1 / (sigma**2 * 0.9), 0.8
    J = dense_jacobians(model, X)
    lam = output_hessians(model(X).detach(), likelihood).diagonal(dim1=1, dim2=2)
    X_test = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    Jt = dense_jacobians(model, X_test)
    log_det, covs = 0.0, []
    for o in range(n_out):
        K = J[:, o] @ J[:, o].T / delta
        Ks = Jt[:, o] @ J[:, o].T / delta
        Kss = Jt[:, o] @ Jt[:, o].T / delta
        noise = torch.diag(1 / (c * lam[:, o]))
        covs.append(Kss - Ks @ torch.linalg.solve(K + noise, Ks.T))
        root = torch.diag(lam[:, o].sqrt())
        log_det += torch.linalg.slogdet(torch.eye(len(X)) + c * root @ K @ root)[1]
    torch.testing.assert_close(la.log_det_ratio, log_det, rtol=RTOL, atol=0)
    _, var = la.predictive_moments(X_test)
    expected = torch.diag_embed(torch.stack([cv.diagonal() for cv in covs], -1))
    torch.testing.assert_close(var, expected, rtol=RTOL, atol=1e-12)
    _, joint = la.predictive_moments(X_test, joint=True)
    joint = joint.reshape(4, n_out, 4, n_out)
    for o in range(n_out):
        torch.testing.assert_close(joint[:, o, :, o], covs[o], rtol=RTOL, atol=1e-12)
        other = [q for q in range(n_out) if q != o]
        assert joint[:, o][:, :, other].abs().max() == 0


def test_subset_of_data_is_full_laplace_on_the_subset():
    model = tiny_net(1)
    X, y = data("regression", 1)
    la = FunctionalLaplace(model, "regression", n_subset=9, seed=4, prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True))
    # laplace-torch's subset for seed 4
    idx = torch.as_tensor(np.random.default_rng(4).choice(20, 9, replace=False))
    full = FullLaplace(model, "regression", prior_precision=0.5)
    full.fit(DataLoader(TensorDataset(X[idx], y[idx]), batch_size=4))
    assert la.n_data == 9
    torch.testing.assert_close(
        la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=RTOL, atol=0
    )
    X_test = torch.randn(3, 2)
    torch.testing.assert_close(la(X_test)[1], full(X_test)[1], rtol=RTOL, atol=1e-12)


def test_prior_tuning_matches_weight_space():
    la, model, X, y, _ = _fit("all", "classification", 3)
    full = FullLaplace(model, "classification", prior_precision=0.8, temperature=0.9)
    full.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    la.optimize_prior_precision(method="marglik", n_steps=30)
    full.optimize_prior_precision(method="marglik", n_steps=30)
    torch.testing.assert_close(
        la.prior_precision, full.prior_precision, rtol=RTOL, atol=0
    )
    val = DataLoader(
        TensorDataset(*data("classification", 3, n=10, seed=5)), batch_size=5
    )
    kw = dict(method="gridsearch", val_loader=val, grid_size=7)
    la.optimize_prior_precision(**kw)
    full.optimize_prior_precision(pred_type="glm", **kw)
    torch.testing.assert_close(
        la.prior_precision, full.prior_precision, rtol=RTOL, atol=0
    )
    with pytest.raises(ValueError, match="prior_structure='scalar'"):
        la.optimize_prior_precision(prior_structure="layerwise")
    with pytest.raises(ValueError, match="pred_type='gp'"):
        la.optimize_prior_precision(pred_type="glm")


def test_sampling():
    la, *_ = _fit("all", "regression", 2)
    X_test = torch.randn(3, 2)
    mean, var = la(X_test)
    s = la.functional_samples(
        X_test, n_samples=40000, generator=torch.Generator().manual_seed(0)
    )
    assert s.shape == (40000, 3, 2)
    scale = var.diagonal(dim1=1, dim2=2).max().item()
    # 4e4 draws: standard errors sqrt(var/4e4) (mean), var*sqrt(2/4e4) (covariance)
    torch.testing.assert_close(s.mean(0), mean, rtol=0, atol=5 * math.sqrt(scale / 4e4))
    emp = torch.einsum("sbi,sbj->bij", s - mean, s - mean) / 4e4
    torch.testing.assert_close(emp, var, rtol=0, atol=5 * scale * math.sqrt(2 / 4e4))
    joint = la.functional_samples(
        X_test, n_samples=40000, joint=True, generator=torch.Generator().manual_seed(1)
    )
    _, cov = la(X_test, joint=True)
    flat = joint.reshape(40000, -1) - mean.flatten()
    torch.testing.assert_close(
        flat.T @ flat / 4e4,
        cov,
        rtol=0,
        atol=5 * cov.diagonal().max().item() * math.sqrt(2 / 4e4),
    )
    g = torch.Generator().manual_seed(3)
    a = la.functional_samples(X_test, n_samples=5, generator=g)
    b = la.functional_samples(
        X_test, n_samples=5, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    diag = la.functional_samples(
        X_test,
        n_samples=20000,
        diagonal_output=True,
        generator=torch.Generator().manual_seed(2),
    )
    emp_cross = ((diag[..., 0] - mean[:, 0]) * (diag[..., 1] - mean[:, 1])).mean(0)
    assert emp_cross.abs().max() < 5 * scale * math.sqrt(1 / 2e4)
    cls, *_ = _fit("all", "classification", 3)
    torch.testing.assert_close(cls.predictive(X_test), cls(X_test), rtol=0, atol=0)
    p = cls.predictive_samples(X_test, n_samples=7)
    assert p.shape == (7, 3, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(7, 3), rtol=1e-12, atol=1e-12)
    probs = cls(
        X_test,
        link_approx="mc",
        n_samples=50,
        generator=torch.Generator().manual_seed(0),
    )
    again = cls(
        X_test,
        link_approx="mc",
        n_samples=50,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(probs, again, rtol=0, atol=0)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_state_dict_round_trip_and_validation(subset):
    la, model, X, y, _ = _fit(subset, "classification", 3)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    cls = type(la)
    new = cls(
        model, "classification", n_subset=20, prior_precision=3.0, temperature=0.9
    )
    new.load_state_dict(state)
    X_test = torch.randn(4, 2)
    torch.testing.assert_close(new(X_test), la(X_test), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        new.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(new.prior_precision, la.prior_precision)

    other = tiny_net(3, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        cls(other, "classification", n_subset=20).load_state_dict(state)
    with pytest.raises(ValueError, match="backend_kwargs"):
        cls(
            model,
            "classification",
            n_subset=20,
            backend_kwargs={"kfac_approx": "reduce"},
        ).load_state_dict(state)
    with pytest.raises(ValueError, match="dict_key_x"):
        cls(model, "classification", n_subset=20, dict_key_x="x").load_state_dict(state)
    with pytest.raises(ValueError, match="n_subset"):
        cls(model, "classification", n_subset=10).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        cls(model, "classification", n_subset=20).load_state_dict(
            {k: v for k, v in state.items() if k != "subset_inputs"}
        )
    with pytest.raises(ValueError, match="cls_name"):
        ELLA(model, "classification", 5, 2).load_state_dict(state)


class DictNet(nn.Module):
    """A model taking dict-like batches, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(2)

    def forward(self, batch):
        return self.net(batch["input_ids"])


def test_dict_inputs_and_uneven_batches():
    model = DictNet()
    X, y = data("classification", 2, n=12)
    rows = [{"input_ids": X[i], "labels": y[i]} for i in range(12)]
    loader = DataLoader(rows, batch_size=5)
    la = FunctionalLaplace(model, "classification", n_subset=12)
    la.fit(loader)
    full = FullLaplace(model, "classification")
    full.fit(loader)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=RTOL, atol=0
    )
    batch = {"input_ids": torch.randn(3, 2)}
    torch.testing.assert_close(la(batch), full(batch), rtol=RTOL, atol=0)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    new = FunctionalLaplace(model, "classification", n_subset=12)
    new.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(new(batch), la(batch), rtol=1e-12, atol=0)
    valla = VaLLA(model, "classification", "random", num_inducing=3)
    valla.fit(loader, iterations=2)
    assert valla(batch).shape == (3, 2)


def test_misuse_errors():
    model = tiny_net(2)
    with pytest.raises(ValueError, match="scalar"):
        FunctionalLaplace(
            model, "regression", n_subset=3, prior_precision=torch.ones(2)
        )
    la = FunctionalLaplace(model, "regression", n_subset=30)
    with pytest.raises(ValueError, match="scalar"):
        la.prior_precision = torch.ones(4)
    with pytest.raises(NotFittedError):
        la(torch.randn(2, 2))
    with pytest.raises(ValueError, match="exceeds"):
        la.fit(DataLoader(TensorDataset(*data("regression", 2)), batch_size=5))
    with pytest.raises(ValueError, match="n_subset"):
        FunctionalLaplace(model, "regression", n_subset=0)
    with pytest.raises(ValueError, match="GGN"):
        FunctionalLaplace(model, "regression", n_subset=3, backend=CurvlinopsEF)
    with pytest.raises(ValueError, match="stochastic"):
        FunctionalLaplace(
            model, "regression", n_subset=3, backend_kwargs={"stochastic": True}
        )
    la, *_ = _fit("all", "classification", 3)
    for pred_type in ("glm", "nn"):
        with pytest.raises(ValueError, match="pred_type='gp'"):
            la(torch.randn(2, 2), pred_type=pred_type)
    with pytest.raises(ValueError, match="joint"):
        la(torch.randn(2, 2), joint=True)
    with pytest.raises(ValueError, match="sigma_noise"):
        la.log_marginal_likelihood(sigma_noise=0.5)
    with pytest.raises(ValueError, match="n_samples"):
        la(torch.randn(2, 2), link_approx="mc", n_samples=0)


def test_factory_routes_functional_classes():
    model = tiny_net(1)
    assert (
        type(Laplace(model, "regression", "all", "gp", n_subset=3)) is FunctionalLaplace
    )
    assert type(Laplace(model, "regression", "last_layer", "gp", n_subset=3)) is (
        FunctionalLLLaplace
    )
    ella = Laplace(
        model,
        "regression",
        "all",
        "gp",
        functional_approximation="nystrom",
        subsample_size=4,
        n_eigenvalues=2,
    )
    assert type(ella) is ELLA
    valla = Laplace(
        model,
        "regression",
        "all",
        "gp",
        functional_approximation="variational",
        inducing_locations="random",
        num_inducing=3,
    )
    assert type(valla) is VaLLA


def test_fit_keeps_user_gradients_and_model():
    model = tiny_net(1)
    X, y = data("regression", 1)
    model(X).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    la = FunctionalLaplace(model, "regression", n_subset=20)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=7))
    la(X[:3])
    assert model.training
    for p, g, b in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        torch.testing.assert_close(p, b, rtol=0, atol=0)
