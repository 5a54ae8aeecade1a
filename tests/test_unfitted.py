"""Before ``fit`` an object holds the prior (as in laplace-torch 0.3): ``mean`` is
``prior_mean``, ``H`` a zero curvature of the final structure, allocated on first
access (``None`` while a last layer is unknown), ``_init_H()`` resets it to
zeros, and ``log_prob`` is the prior log density."""

import math

import pytest
import torch
from state_cases import PARAMETRIC, SUBNET, fitted, make
from torch import nn

from laplace import FullLaplace
from laplace.utils.matrix import Kron

# tiny tensors: one thread avoids thread start-up on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")

P, P_LAST, K = 27, 15, len(SUBNET)
# Kronecker factor shapes of tiny_net(3): Linear(2, 4), Linear(4, 3)
KRON_ALL = [[(4, 4), (2, 2)], [(4, 4)], [(3, 3), (4, 4)], [(3, 3)]]
KRON_LAST = [[(3, 3), (4, 4)], [(3, 3)]]


def _assert_zero_structure(kind, H):
    if kind in ("ll_full", "ll_kron", "ll_diag"):
        assert H is None  # the last layer is found on the first batch of fit
        return
    if kind == "kron":
        assert isinstance(H, Kron)
        assert [[tuple(F.shape) for F in b] for b in H.kfacs] == KRON_ALL
        assert all(torch.equal(F, torch.zeros_like(F)) for b in H.kfacs for F in b)
        return
    if kind == "lowrank":
        U, eigenvalues = H
        assert U.shape == (P, 14) and eigenvalues.shape == (14,)
        torch.testing.assert_close(U.T @ U, torch.eye(14), rtol=0, atol=0)
        assert torch.equal(eigenvalues, torch.zeros(14))
        return
    shape = {
        "full": (P, P),
        "diag": (P,),
        "ll_named_full": (P_LAST, P_LAST),
        "subnet_full": (K, K),
        "subnet_diag": (K,),
    }[kind]
    assert H.shape == shape and H.dtype == torch.float64
    assert torch.equal(H, torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("kind", PARAMETRIC)
def test_unfitted_mean_is_prior_mean_and_H_zero_of_final_structure(kind):
    la = make(kind)
    assert not la.is_fitted
    assert la.mean.shape == () and torch.equal(la.mean, la.prior_mean)
    _assert_zero_structure(kind, la.H)


@pytest.mark.parametrize("kind", ["full", "diag", "subnet_full"])
def test_unfitted_mean_follows_a_vector_prior_mean(kind):
    n = K if kind.startswith("subnet") else P
    prior_mean = torch.linspace(-1, 1, n)
    la = make(kind)
    la = type(la)(
        la.model,
        "classification",
        prior_mean=prior_mean,
        **({"subnetwork_indices": SUBNET} if kind.startswith("subnet") else {}),
    )
    torch.testing.assert_close(la.mean, prior_mean, rtol=0, atol=0)


def test_kron_last_layer_zero_factors_once_the_layer_is_known():
    la = make("ll_kron")
    la = type(la)(la.model.model, "classification", last_layer_name="2")
    assert [[tuple(F.shape) for F in b] for b in la.H.kfacs] == KRON_LAST


def test_H_is_allocated_on_first_access_only():
    # a dense (P, P) zero curvature over 100k parameters would need 80 GB
    la = FullLaplace(nn.Linear(1000, 100).double(), "regression")
    assert vars(la)["_H"] is None
    small = make("full")
    assert vars(small)["_H"] is None
    H = small.H
    assert vars(small)["_H"] is H and small.H is H


@pytest.mark.parametrize("kind", ["full", "kron", "diag", "ll_kron", "subnet_diag"])
def test_init_H_resets_the_curvature_to_zeros(kind):
    la = fitted(kind)
    # Kron keeps the factors in H_facs and their eigendecomposition in H
    curvature = (lambda: la.H_facs) if "kron" in kind else (lambda: la.H)
    assert not _is_zero(curvature())
    la._init_H()
    assert _is_zero(curvature())
    expected = make(kind).H if not kind.startswith("ll_") else None
    if expected is not None:
        _assert_same_layout(curvature(), expected)


def _is_zero(H):
    factors = [F for b in H.kfacs for F in b] if isinstance(H, Kron) else [H]
    return all(not F.any() for F in factors)


def _assert_same_layout(a, b):
    if isinstance(b, Kron):
        assert [[F.shape for F in x] for x in a.kfacs] == [
            [F.shape for F in x] for x in b.kfacs
        ]
    else:
        assert a.shape == b.shape


def _prior_log_density(theta, prior_mean, prior_precision):
    """Independent ground truth: a product of univariate normals."""
    std = prior_precision.expand_as(theta).rsqrt()
    mean = prior_mean.expand_as(theta)
    return torch.distributions.Normal(mean, std).log_prob(theta).sum()


PRIORS = {
    "scalar": lambda n, layers: (torch.tensor(0.3), 0.7),
    "per_layer": lambda n, layers: (
        torch.linspace(-0.5, 0.5, n),
        torch.tensor([0.5, 2.0, 3.0, 4.0][:layers]),
    ),
    "per_parameter": lambda n, layers: (
        torch.tensor(0.1),
        torch.linspace(0.2, 5.0, n),
    ),
}


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("kind", ["full", "diag", "kron", "lowrank"])
def test_unfitted_log_prob_is_the_prior_log_density(kind, prior):
    if kind == "kron" and prior == "per_parameter":
        pytest.skip("KronLaplace has no per-parameter prior")
    prior_mean, prior_precision = PRIORS[prior](P, 4)
    la = make(kind)
    la.prior_mean, la.prior_precision = prior_mean, prior_precision
    theta = torch.randn(P, generator=torch.Generator().manual_seed(0))
    diag = torch.as_tensor(prior_precision, dtype=torch.float64)
    if diag.numel() == 4:  # one value per parameter tensor
        diag = diag.repeat_interleave(torch.tensor([8, 4, 12, 3]))
    expected = _prior_log_density(theta, torch.as_tensor(prior_mean), diag)
    torch.testing.assert_close(la.log_prob(theta), expected, rtol=1e-12, atol=0)
    unnormalized = -0.5 * (diag * (theta - prior_mean).square()).sum()
    torch.testing.assert_close(
        la.log_prob(theta, normalized=False), unnormalized, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("kind", ["subnet_full", "subnet_diag"])
def test_unfitted_subnetwork_log_prob_is_the_prior_on_the_subnetwork(kind):
    la = make(kind)
    la.prior_precision = 0.4
    theta_full = torch.randn(P, generator=torch.Generator().manual_seed(1))
    expected = _prior_log_density(
        theta_full[SUBNET], torch.tensor(0.0), torch.tensor(0.4)
    )
    torch.testing.assert_close(la.log_prob(theta_full), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        la.log_prob(theta_full[SUBNET]), expected, rtol=1e-12, atol=0
    )


def test_unfitted_last_layer_log_prob_before_the_layer_is_known():
    la = make("ll_diag")
    la.prior_precision = 2.0
    theta = torch.randn(P_LAST, generator=torch.Generator().manual_seed(2))
    expected = _prior_log_density(theta, torch.tensor(0.0), torch.tensor(2.0))
    torch.testing.assert_close(la.log_prob(theta), expected, rtol=1e-12, atol=0)
    assert math.isfinite(float(la.log_prob(theta, normalized=False)))


@pytest.mark.parametrize("kind", ["full", "kron", "diag"])
def test_fitted_log_prob_is_no_longer_the_prior(kind):
    la = fitted(kind)
    theta = la.mean + 0.1
    prior = _prior_log_density(theta, torch.tensor(0.0), la.prior_precision_diag)
    assert not torch.allclose(la.log_prob(theta), prior)
