"""LowRankLaplace on tiny nets in float64 against dense torch.func ground truth:
top-k eigenpairs, Woodbury covariance, log-determinant, marginal likelihood,
GLM predictive and sampling."""

import io
import math

import pytest
import torch
from ground_truth import dense_ggn, dense_jacobians, tiny_loader, tiny_net
from torch.utils.data import DataLoader, TensorDataset

import laplace.structures.lowrank as lowrank_module
from laplace import FullLaplace, Laplace, LowRankLaplace
from laplace.curvature import CurvlinopsEF, GGNInterface

RTOL = 1e-6
N_PARAMS = {1: 17, 2: 22, 3: 27}  # 2 -> 4 -> n_out


CASES = [("classification", 3), ("regression", 2)]


def fit_lowrank(likelihood, n_out, rank, prior=0.8, **kwargs):
    model = tiny_net(n_out)
    dl, X = tiny_loader(likelihood, n_out)
    la = LowRankLaplace(
        model,
        likelihood,
        prior_precision=prior,
        backend_kwargs={"low_rank": rank},
        **kwargs,
    )
    la.fit(dl)
    return la, model, dl, X


def reg_kwargs(likelihood):
    return {"sigma_noise": 0.7} if likelihood == "regression" else {}


@pytest.mark.parametrize("likelihood,n_out", CASES)
@pytest.mark.parametrize("prior_kind", ["scalar", "per_param"])
def test_full_rank_equals_full_laplace(likelihood, n_out, prior_kind):
    P = N_PARAMS[n_out]
    prior = 0.8 if prior_kind == "scalar" else torch.linspace(0.5, 2.0, P)
    kwargs = {**reg_kwargs(likelihood), "temperature": 0.9}
    la, model, dl, X = fit_lowrank(likelihood, n_out, P, prior=prior, **kwargs)
    full = FullLaplace(model, likelihood, prior_precision=prior, **kwargs)
    full.fit(dl)
    # posterior precision rebuilt from ((U, c lambda), p0) equals the dense one
    (U, scaled), p0 = la.posterior_precision
    assert U.shape == (P, P) and scaled.shape == (P,)
    ggn = dense_ggn(model, X, likelihood)
    c = 1 / (0.7**2 * 0.9) if likelihood == "regression" else 1 / 0.9
    dense_P = c * ggn + torch.diag(torch.as_tensor(prior).expand(P))
    torch.testing.assert_close(
        U @ torch.diag(scaled) @ U.T + torch.diag(p0), dense_P, rtol=RTOL, atol=1e-10
    )
    # Woodbury covariance D - V Kinv V^T
    cov = torch.diag(1 / p0) - la.V @ la.Kinv @ la.V.T
    torch.testing.assert_close(cov, torch.linalg.inv(dense_P), rtol=RTOL, atol=1e-10)
    torch.testing.assert_close(
        la.log_det_posterior_precision,
        torch.linalg.slogdet(dense_P)[1],
        rtol=RTOL,
        atol=0,
    )
    torch.testing.assert_close(
        la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=RTOL, atol=0
    )
    X_test = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    if likelihood == "regression":
        for joint in (False, True):
            for a, b in zip(la(X_test, joint=joint), full(X_test, joint=joint)):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-10)
        J = dense_jacobians(model, X_test)
        torch.testing.assert_close(
            la(X_test)[1], J @ torch.linalg.solve(dense_P, J.mT), rtol=RTOL, atol=1e-10
        )
    else:
        for link in ("probit", "bridge"):
            torch.testing.assert_close(
                la(X_test, link_approx=link),
                full(X_test, link_approx=link),
                rtol=RTOL,
                atol=0,
            )


def test_marglik_gradient_matches_full_laplace():
    la, model, dl, _ = fit_lowrank("regression", 2, 22)
    full = FullLaplace(model, "regression", prior_precision=0.8)
    full.fit(dl)
    grads = []
    for approx in (la, full):
        log_prior = torch.tensor([0.3], requires_grad=True)
        sigma = torch.tensor(0.6, requires_grad=True)
        approx.log_marginal_likelihood(log_prior.exp(), sigma).backward()
        grads.append(torch.cat([log_prior.grad, sigma.grad.reshape(1)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=RTOL, atol=0)


@pytest.mark.parametrize("likelihood,n_out", CASES)
def test_lanczos_top_k_matches_dense_eigh(likelihood, n_out, monkeypatch):
    def no_dense(*args, **kwargs):
        raise AssertionError("k << P must use Lanczos, not the dense path")

    monkeypatch.setattr(lowrank_module, "dense_eigh", no_dense)
    k = 5
    la, model, _, X = fit_lowrank(likelihood, n_out, k, **reg_kwargs(likelihood))
    evals, evecs = torch.linalg.eigh(dense_ggn(model, X, likelihood))
    evals, evecs = evals.flip(0)[: k + 1], evecs.flip(1)[:, :k]
    # a clear gap after the k-th eigenvalue makes the top-k subspace well defined
    assert evals[k - 1] - evals[k] > 1e-2 * evals[0]
    U, lam = la.H
    torch.testing.assert_close(lam, evals[:k], rtol=RTOL, atol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(k), rtol=0, atol=1e-8)
    torch.testing.assert_close(U @ U.T, evecs @ evecs.T, rtol=0, atol=1e-6)
    # posterior quantities equal those of the dense rank-k precision
    c = la._H_factor
    P_k = evecs @ torch.diag(c * evals[:k]) @ evecs.T + 0.8 * torch.eye(len(U))
    torch.testing.assert_close(
        la.log_det_posterior_precision, torch.linalg.slogdet(P_k)[1], rtol=RTOL, atol=0
    )
    X_test = torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
    J = dense_jacobians(model, X_test)
    f_var = J @ torch.linalg.solve(P_k, J.mT)
    torch.testing.assert_close(la.functional_variance(J), f_var, rtol=RTOL, atol=1e-10)
    torch.testing.assert_close(
        la._precision().square_form_diagonal(J),
        f_var.diagonal(dim1=1, dim2=2),
        rtol=RTOL,
        atol=1e-10,
    )
    delta = torch.randn(len(U), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        la.log_prob(la.mean + delta),
        -0.5 * delta @ P_k @ delta
        + 0.5 * (torch.linalg.slogdet(P_k)[1] - len(U) * math.log(2 * math.pi)),
        rtol=RTOL,
        atol=0,
    )


def test_float32_model_converges():
    """float32 curvature products limit the Lanczos residual to sqrt(eps):
    eigenvalues agree with the float64 ground truth to float32 accuracy."""
    la64, model, _, X = fit_lowrank("classification", 3, 4)
    model32 = tiny_net(3).float()
    dl, _ = tiny_loader("classification", 3)
    la32 = LowRankLaplace(model32, "classification", backend_kwargs={"low_rank": 4})
    la32.fit(
        DataLoader(
            TensorDataset(dl.dataset.tensors[0].float(), dl.dataset.tensors[1]),
            batch_size=10,
        )
    )
    U, lam = la32.H
    assert U.dtype == lam.dtype == torch.float32
    torch.testing.assert_close(lam.double(), la64.H[1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("prior_kind", ["scalar", "per_param"])
def test_samples_have_posterior_covariance(prior_kind):
    P = 27
    prior = 0.5 if prior_kind == "scalar" else torch.linspace(0.3, 3.0, P)
    la, *_ = fit_lowrank("classification", 3, 6, prior=prior)
    (U, scaled), p0 = la.posterior_precision
    cov = torch.linalg.inv(U @ torch.diag(scaled) @ U.T + torch.diag(p0))
    # exact: the deviations are a linear map M with M M^T = Sigma
    M = la._precision().sample_deviations(torch.eye(P)).T
    torch.testing.assert_close(M @ M.T, cov, rtol=RTOL, atol=1e-12)
    n = 100000
    samples = la.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, P)
    # Monte Carlo: std error of a covariance entry ~ sqrt(2/n) * var; 5 std errors
    scale = cov.diagonal().max().item()
    tol = 5 * math.sqrt(2 / n) * scale
    torch.testing.assert_close(
        samples.mean(0), la.mean, rtol=0, atol=5 * math.sqrt(scale / n)
    )
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0, atol=tol)
    again = la.sample(n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, again, rtol=0, atol=0)


def test_nn_predictive_and_state_dict_roundtrip():
    la, model, dl, X = fit_lowrank("regression", 1, 4)
    mean, var = la(
        X[:3],
        pred_type="nn",
        link_approx="mc",
        n_samples=20,
        generator=torch.Generator().manual_seed(0),
    )
    assert mean.shape == (3, 1) and var.shape == (3, 1)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    restored = LowRankLaplace(
        model, "regression", prior_precision=0.8, backend_kwargs={"low_rank": 4}
    )
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(
        restored.log_marginal_likelihood(), la.log_marginal_likelihood(), rtol=0, atol=0
    )
    for a, b in zip(restored(X[:3]), la(X[:3])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_factory_caps_rank_and_passes_backend_kwargs():
    model = tiny_net(1)
    dl, X = tiny_loader("regression", 1)
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="lowrank",
        backend_kwargs={"low_rank": 100},
    )
    assert isinstance(la, LowRankLaplace)
    la.fit(dl)
    assert la.H[0].shape == (17, 17)
    # low_rank is not forwarded to the backend (it would warn on an unknown kwarg)
    assert "low_rank" not in la._backend_init_kwargs()
    la_ef = LowRankLaplace(
        model, "regression", backend=CurvlinopsEF, backend_kwargs={"low_rank": 17}
    )
    la_ef.fit(dl)
    f = model(X).detach()
    G = dense_jacobians(model, X).mT @ (f - dl.dataset.tensors[1]).unsqueeze(-1)
    ef = (G @ G.mT).sum(0)
    U, lam = la_ef.H
    torch.testing.assert_close(U @ torch.diag(lam) @ U.T, ef, rtol=RTOL, atol=1e-10)


def test_errors():
    model = tiny_net(1)
    dl, _ = tiny_loader("regression", 1)
    for bad in (0, -2, 2.5, True, "10"):
        with pytest.raises(ValueError, match="low_rank"):
            LowRankLaplace(model, "regression", backend_kwargs={"low_rank": bad})
    with pytest.raises(ValueError, match="curvlinops"):
        LowRankLaplace(model, "regression", backend=GGNInterface)
    la = LowRankLaplace(model, "regression", backend_kwargs={"low_rank": 3})
    with pytest.raises(ValueError, match="fit"):
        la.log_marginal_likelihood()
    la.fit(dl)
    with pytest.raises(ValueError, match="override=False"):
        la.fit(dl, override=False)
