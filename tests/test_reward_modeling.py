"""Reward modelling: fit as classification on preference pairs, predict rewards
as regression. Ground truth: the dense GGN of the pairwise cross-entropy with
logits (r(x_1), r(x_2)), built with torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace


class RewardModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        r = self.head(self.body(x))
        return r.squeeze(-1) if x.ndim == 3 else r  # pairs -> (batch, 2) logits


def pairs(n=16):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(2, (n,), generator=gen)
    return X, y


def dense_pair_ggn(model, X, last_layer):
    named = {k: v.detach() for k, v in model.named_parameters()}
    if last_layer:
        named = {k: v for k, v in named.items() if k.startswith("head.")}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(named)
    J = torch.cat([j.reshape(len(X), 2, -1) for j in J.values()], -1)
    p = torch.softmax(model(X).detach(), -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("bop,boq,bqr->pr", J, lam, J)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_reward_model_posterior_and_prediction(subset):
    model = RewardModel().double()
    X, y = pairs()
    la = Laplace(model, "reward_modeling", subset, "full", prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    ggn = dense_pair_ggn(model, X, subset == "last_layer")
    P = ggn + 0.5 * torch.eye(len(ggn))
    torch.testing.assert_close(la.posterior_precision, P, rtol=1e-8, atol=1e-12)
    # prediction on single items is a regression of the reward
    x = torch.randn(4, 3, dtype=torch.float64)
    f_mu, f_var = la(x)
    assert f_mu.shape == (4, 1) and f_var.shape == (4, 1, 1)
    named = {k: v.detach() for k, v in model.named_parameters()}
    if subset == "last_layer":
        named = {k: v for k, v in named.items() if k.startswith("head.")}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(named)
    J = torch.cat([j.reshape(4, 1, -1) for j in J.values()], -1)
    expected = J @ torch.linalg.solve(P, J.transpose(1, 2))
    torch.testing.assert_close(f_var, expected, rtol=1e-8, atol=1e-12)
    # with fitting=True the pairs get class probabilities
    probs = la(X[:3], fitting=True)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=1e-12, atol=0)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_reward_model_last_layer_structures_fit(structure):
    model = RewardModel().double()
    X, y = pairs()
    la = Laplace(model, "reward_modeling", "last_layer", structure)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    assert torch.isfinite(la.log_marginal_likelihood())
    f_mu, f_var = la(torch.randn(2, 3, dtype=torch.float64))
    assert f_var.shape == (2, 1, 1) and (f_var > 0).all()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_bfloat16_model_outputs_in_bfloat16(subset, structure):
    """Computed in float32 inside, returned in the model's dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).bfloat16()
    X = torch.randn(30, 4).bfloat16()
    y = torch.randint(3, (30,))
    la = Laplace(model, "classification", subset, structure)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    probs = la(X[:3])
    assert probs.dtype == torch.bfloat16 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(3), rtol=0, atol=1e-2)
    assert la.log_marginal_likelihood().dtype == torch.bfloat16


def dense_pair_jacobians(model, X, last_layer):
    named = {k: v.detach() for k, v in model.named_parameters()}
    if last_layer:
        named = {k: v for k, v in named.items() if k.startswith("head.")}
    J = jacrev(lambda p: functional_call(model, p, (X,)))(named)
    return torch.cat([j.reshape(len(X), 2, -1) for j in J.values()], -1)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_reward_model_pair_predictive_has_pair_shape(subset, structure):
    """Predicting on pairs: the output has K = 2 entries per example, so the
    variance is (B, 2, 2) (it used to be (B, 1, 1) for all weights); for full,
    it is J Sigma J^T of both rewards."""
    model = RewardModel().double()
    X, y = pairs()
    la = Laplace(model, "reward_modeling", subset, structure, prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    f_mu, f_var = la(X[:5])
    assert f_mu.shape == (5, 2) and f_var.shape == (5, 2, 2)
    torch.testing.assert_close(f_mu, model(X[:5]).detach(), rtol=0, atol=0)
    if structure == "full":
        P = dense_pair_ggn(model, X, subset == "last_layer") + 0.5 * torch.eye(
            la.n_params
        )
        J = dense_pair_jacobians(model, X[:5], subset == "last_layer")
        expected = J @ torch.linalg.solve(P, J.mT)
        torch.testing.assert_close(f_var, expected, rtol=1e-8, atol=1e-12)
    assert la(X[:5], diagonal_output=True)[1].shape == (5, 2)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_reward_model_gridsearch_scores_pair_nll(subset):
    """Grid search scores the NLL of the fitting=True pair probabilities (probit
    link) and picks its minimiser; ground truth from the dense GGN."""
    model = RewardModel().double()
    X, y = pairs(24)
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    X_val, y_val = X[:10], 1 - y[:10]  # flipped labels: a real trade-off
    val_loader = DataLoader(TensorDataset(X_val, y_val), batch_size=4)
    la = Laplace(model, "reward_modeling", subset, "full")
    la.fit(loader)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val_loader,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=9,
    )
    ggn = dense_pair_ggn(model, X, subset == "last_layer")
    J = dense_pair_jacobians(model, X_val, subset == "last_layer")
    f = model(X_val).detach()
    grid = torch.logspace(-2, 2, 9, dtype=torch.float64)
    nll = []
    for delta in grid:
        var = J @ torch.linalg.solve(ggn + delta * torch.eye(len(ggn)), J.mT)
        kappa = torch.rsqrt(1 + torch.pi / 8 * var.diagonal(dim1=1, dim2=2))
        probs = torch.softmax(kappa * f, -1)
        nll.append(-probs[torch.arange(10), y_val].log().mean())
    nll = torch.stack(nll)
    assert nll.max() - nll.min() > 1e-3  # the grid points are distinguishable
    # an interior minimum, well separated from the runner-up
    assert 0 < nll.argmin() < len(grid) - 1
    assert nll.sort().values[1] - nll.min() > 1e-6
    torch.testing.assert_close(la.prior_precision, grid[nll.argmin()].reshape(1))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_reward_predictions_have_a_joint_covariance_and_pair_samples(subset):
    """Rewards are means and variances, so joint=True gives the joint covariance
    J Sigma J^T over all items (as for regression); class probabilities of
    pairs (fitting=True) have none. predictive_samples(fitting=True) draws pair
    probabilities."""
    model = RewardModel().double()
    X, y = pairs()
    la = Laplace(model, "reward_modeling", subset, "full", prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    x = torch.randn(4, 3, dtype=torch.float64)
    f_mu, f_cov = la(x, joint=True)
    assert f_mu.shape == (4,) and f_cov.shape == (4, 4)
    P = dense_pair_ggn(model, X, subset == "last_layer") + 0.5 * torch.eye(la.n_params)
    named = {k: v.detach() for k, v in model.named_parameters()}
    if subset == "last_layer":
        named = {k: v for k, v in named.items() if k.startswith("head.")}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(named)
    J = torch.cat([j.reshape(4, -1) for j in J.values()], -1)
    torch.testing.assert_close(
        f_cov, J @ torch.linalg.solve(P, J.T), rtol=1e-8, atol=1e-12
    )
    with pytest.raises(ValueError, match="joint"):
        la(X[:3], joint=True, fitting=True)
    samples = la.predictive_samples(X[:3], n_samples=5, fitting=True)
    assert samples.shape == (5, 3, 2)
    torch.testing.assert_close(samples.sum(-1), torch.ones(5, 3), rtol=1e-12, atol=0)
