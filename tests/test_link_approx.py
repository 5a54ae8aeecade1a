"""Link approximations against hand-written reference formulas: the Laplace
bridge and laplace-torch's per-example ``bridge_norm``, including inputs that
overflow a naive implementation."""

import math

import pytest
import torch
from ground_truth import tiny_data, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.predictive import bridge_probs


def reference_bridge(
    mu: torch.Tensor, cov: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """One example, written out: optional per-example normalisation, the Gaussian
    conditioned on ``sum(f) = 0``, then the Dirichlet mean of the bridge."""
    K = len(mu)
    if normalize:
        m = cov.diagonal().mean() / math.sqrt(K / 2)
        mu, cov = mu / m.sqrt(), cov / m
    ones = torch.ones(K, dtype=mu.dtype)
    s = cov @ ones
    total = ones @ s
    mu = mu - s * (ones @ mu) / total
    cov = cov - torch.outer(s, s) / total
    alpha = (1 - 2 / K + mu.exp() / K**2 * (-mu).exp().sum()) / cov.diagonal()
    return alpha / alpha.sum()


def random_gaussians(n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = 2 * torch.randn(n, K, generator=gen)
    A = torch.randn(n, K, K, generator=gen)
    # very different variances per class: where per-class rescaling goes wrong
    scales = torch.exp(2 * torch.randn(n, K, 1, generator=gen))
    cov = (scales * A) @ (scales * A).mT + 1e-3 * torch.eye(K)
    return mu, cov


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("K", [2, 3, 7])
def test_bridge_matches_reference_formula(normalize, K):
    mu, cov = random_gaussians(20, K, seed=K)
    expected = torch.stack([reference_bridge(m, c, normalize) for m, c in zip(mu, cov)])
    probs = bridge_probs(mu, cov, normalize=normalize)
    torch.testing.assert_close(probs, expected, rtol=1e-10, atol=1e-14)


def test_bridge_norm_normalises_per_example_not_per_class():
    """Rescaling every example's Gaussian by one factor (what bridge_norm
    normalises away) leaves the bridge_norm probabilities unchanged."""
    mu, cov = random_gaussians(10, 4, seed=0)
    c = torch.linspace(0.1, 30.0, 10).reshape(-1, 1)
    scaled = bridge_probs(mu * c.sqrt(), cov * c.unsqueeze(-1), normalize=True)
    torch.testing.assert_close(
        scaled, bridge_probs(mu, cov, normalize=True), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_bridge_rows_sum_to_one_for_extreme_logits(normalize):
    """Logits of +-800 overflow exp(); the log-space bridge gives the limit."""
    mu = torch.tensor([[0.0, 800.0, -800.0], [1e4, 0.0, 0.0], [-50.0, -60.0, 900.0]])
    cov = torch.eye(3).expand(3, 3, 3) * 1e-2
    probs = bridge_probs(mu, cov, normalize=normalize)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=0, atol=1e-12)
    torch.testing.assert_close(probs.argmax(-1), torch.tensor([1, 0, 2]))
    assert (probs.max(-1).values > 1 - 1e-12).all()


def test_bridge_with_zero_variance_classes():
    """Classes without variance are certain: the row's mass goes to them, rows
    sum to 1 (no 0/0 left behind as NaN or 1/K entries)."""
    mu = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    cov = torch.zeros(3, 3, 3)
    cov[0] = torch.diag(torch.tensor([0.0, 1.0, 2.0]))
    # conditioned on sum(f) = 0 this one has no variance left at all
    cov[1] = torch.diag(torch.tensor([0.0, 0.0, 1.0]))
    for normalize in (False, True):
        probs = bridge_probs(mu, cov, normalize=normalize)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(3), rtol=0, atol=1e-12)
        assert probs[0, 0] == 1
        # all variances zero: equal rates, probabilities from the bridge
        # numerators (equal logits: uniform)
        torch.testing.assert_close(probs[1], torch.full((3,), 1 / 3))
        assert (probs[2] > 0).all() and probs[2].argmax() == 2


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subnetwork_bridge_norm_rows_sum_to_one(structure):
    """Subnetwork posteriors used to give rows like [0, 0, 1/3] with
    'bridge_norm'; now each row is the reference formula and sums to 1."""
    model = tiny_net(3)
    X, y = tiny_data("classification", 3, n=40)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="subnetwork",
        hessian_structure=structure,
        subnetwork_indices=torch.tensor([0, 3, 7, 12, 20, 24]),
        prior_precision=2.0,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    X_test = 3 * torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    f_mu, f_var = la._glm_predictive_distribution(X_test)
    for link, normalize in (("bridge", False), ("bridge_norm", True)):
        probs = la(X_test, link_approx=link)
        torch.testing.assert_close(probs.sum(-1), torch.ones(50), rtol=0, atol=1e-12)
        expected = torch.stack(
            [reference_bridge(m, c, normalize) for m, c in zip(f_mu, f_var)]
        )
        torch.testing.assert_close(probs, expected, rtol=1e-9, atol=1e-12)
