"""ELLA as laplace-torch has it: grid search by validation NLL, no marginal
likelihood, and a Nystrom basis over one random output per subsampled point
(all outputs on request); ground truth from dense float64 Jacobians/GGNs."""

import math

import numpy as np
import pytest
import torch
from ground_truth import dense_ggn, dense_jacobians, tiny_data, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, Laplace

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = dict(log_prior_prec_min=-3, log_prior_prec_max=3, grid_size=13)


def _fit(likelihood, n_out, **kwargs):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, n=40)
    X_val, y_val = tiny_data(likelihood, n_out, n=15, seed=9)
    if likelihood == "classification":
        y_val = (y_val + 1) % n_out  # disagree with training: a real trade-off
    la = ELLA(
        model,
        likelihood,
        subsample_size=12,
        n_eigenvalues=8,
        sigma_noise=0.2 if likelihood == "regression" else 1.0,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    if likelihood == "regression":
        # residuals that the latent variance at prior precision 1 explains best
        var = _dense_covariances(la, model, X, X_val, 1.0).diagonal(dim1=1, dim2=2)
        residual = (var + la.sigma_noise.item() ** 2).sqrt()
        y_val = model(X_val).detach() + residual * torch.sign(y_val)
    return la, model, X, X_val, y_val


def _dense_covariances(la, model, X, X_val, delta):
    """``phi (c V^T H V + delta I)^{-1} phi^T`` with ``phi = J V``, from dense
    Jacobians and GGN (``V``: the directions, checked against dense Nystrom
    elsewhere)."""
    V = la.dual_directions
    H = dense_ggn(model, X, la.likelihood.value)
    c = 1 / la.sigma_noise.item() ** 2
    phi = dense_jacobians(model, X_val) @ V
    P = c * V.T @ H @ V + delta * torch.eye(V.shape[1])
    return phi @ torch.linalg.solve(P, phi.mT)


@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
def test_gridsearch_picks_the_lowest_validation_nll(likelihood, n_out):
    la, model, X, X_val, y_val = _fit(likelihood, n_out)
    val = DataLoader(TensorDataset(X_val, y_val), batch_size=4)
    la.optimize_prior_precision(method="gridsearch", val_loader=val, **GRID)
    grid = torch.logspace(-3, 3, 13, dtype=torch.float64)
    f = model(X_val).detach()
    nll = []
    for delta in grid:
        cov = _dense_covariances(la, model, X, X_val, delta)
        if likelihood == "classification":
            kappa = torch.rsqrt(1 + math.pi / 8 * cov.diagonal(dim1=1, dim2=2))
            probs = torch.softmax(kappa * f, -1)
            nll.append(-probs[torch.arange(len(y_val)), y_val].log().mean())
        else:
            noisy = cov + 0.04 * torch.eye(n_out)
            dist = torch.distributions.MultivariateNormal(f, covariance_matrix=noisy)
            nll.append(-dist.log_prob(y_val).mean())
    nll = torch.stack(nll)
    # an interior minimum (the first grid point is what a constant score picks)
    assert 0 < nll.argmin() < len(grid) - 1
    assert nll.sort().values[1] - nll.min() > 1e-6
    torch.testing.assert_close(la.prior_precision, grid[nll.argmin()].reshape(1))


def test_marglik_tuning_is_not_implemented():
    la, *_ = _fit("classification", 3)
    with pytest.raises(NotImplementedError, match="marginal likelihood"):
        la.optimize_prior_precision(method="marglik")
    with pytest.raises(NotImplementedError):
        la.log_marginal_likelihood()
    with pytest.raises(ValueError, match="method"):
        la.optimize_prior_precision(method="laplace")


def _in_span(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Whether each row ``(n, P)`` lies in the column span of ``basis`` ``(P, k)``."""
    Q, _ = torch.linalg.qr(basis)
    residual = rows - (rows @ Q) @ Q.T
    return residual.norm(dim=-1) <= 1e-8 * rows.norm(dim=-1)


@pytest.mark.parametrize("factory", [False, True])
def test_nystrom_basis_takes_one_random_output_per_point(factory):
    """Default: the basis spans one Jacobian row per subsampled point, of a
    randomly picked output (n_eigenvalues = subsample size: the whole span);
    nystrom_outputs='all' spans all outputs' rows."""
    model = tiny_net(3)
    X, y = tiny_data("classification", 3, n=30)
    m, seed = 6, 11
    loader = DataLoader(TensorDataset(X, y), batch_size=8)

    def build(**kwargs):
        if factory:
            return Laplace(
                model,
                "classification",
                "all",
                "gp",
                functional_approximation="nystrom",
                subsample_size=m,
                n_eigenvalues=m,
                seed=seed,
                **kwargs,
            )
        return ELLA(
            model,
            "classification",
            subsample_size=m,
            n_eigenvalues=m,
            seed=seed,
            **kwargs,
        )

    la = build()
    assert la.nystrom_outputs == "random"
    la.fit(loader)
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:m]
    J = dense_jacobians(model, X[idx])  # (m, 3, P)
    inside = _in_span(J.reshape(m * 3, -1), la.dual_directions).reshape(m, 3)
    assert inside.sum(1).tolist() == [1] * m  # exactly one output per point
    assert len(set(inside.int().argmax(1).tolist())) > 1  # not always the same one
    every = build(nystrom_outputs="all")
    every.fit(loader)
    # k = m of the 3 m rows: the top eigen-directions of all rows' Gram matrix
    rows = J.reshape(m * 3, -1)
    evals, evecs = torch.linalg.eigh(rows @ rows.T)
    V = rows.T @ (evecs[:, -m:] / evals[-m:].sqrt())
    torch.testing.assert_close(
        every.dual_directions @ every.dual_directions.T, V @ V.T, rtol=0, atol=1e-10
    )
    with pytest.raises(ValueError, match="nystrom_outputs"):
        build(nystrom_outputs="first")


def test_nystrom_outputs_is_part_of_the_checkpoint():
    la, model, *_ = _fit("classification", 3)
    state = la.state_dict()
    assert state["nystrom_outputs"] == "random"
    same = ELLA(model, "classification", subsample_size=12, n_eigenvalues=8)
    same.load_state_dict(state)
    np.testing.assert_allclose(same.dual_directions, la.dual_directions)
    other = ELLA(
        model,
        "classification",
        subsample_size=12,
        n_eigenvalues=8,
        nystrom_outputs="all",
    )
    with pytest.raises(ValueError, match="nystrom_outputs"):
        other.load_state_dict(state)
