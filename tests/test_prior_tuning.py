"""Closed-form marginal-likelihood prior tuning (``laplace.tuning``).

Where ``log det P`` is a sum over the eigenvalues of ``H`` (full with a scalar
prior, Kron per layer, diagonal per parameter), the Adam steps use a closed-form
gradient. Ground truth: finite differences of ``log_marginal_likelihood`` and the
generic autograd + ``torch.optim.Adam`` path on the same posterior.
"""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.tuning import adam

N, D = 40, 3


def _fitted(likelihood, subset, structure, **kwargs):
    torch.manual_seed(0)
    n_out = 2 if likelihood == "classification" else 1
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, n_out))
    X = torch.randn(N, D)
    if likelihood == "classification":
        y = torch.randint(n_out, (N,))
    else:
        y = torch.randn(N, n_out)
        kwargs["sigma_noise"] = 0.7
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.tensor([0, 3, 5, 9, 14, 20])
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_mean=0.1,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    return la


CONFIGS = [
    ("all", "full", "scalar"),
    ("all", "kron", "scalar"),
    ("all", "kron", "layerwise"),
    ("all", "diag", "scalar"),
    ("all", "diag", "layerwise"),
    ("all", "diag", "diag"),
    ("last_layer", "full", "scalar"),
    ("last_layer", "kron", "layerwise"),
    ("last_layer", "diag", "diag"),
    ("subnetwork", "full", "scalar"),
    ("subnetwork", "diag", "diag"),
]


def _generic(la):
    la._prior_spectrum = lambda n_priors: None  # this posterior only
    return la


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize(("subset", "structure", "prior"), CONFIGS)
def test_closed_form_gradient_matches_finite_differences(
    likelihood, subset, structure, prior
):
    la = _fitted(likelihood, subset, structure)
    n_priors = {"scalar": 1, "layerwise": la.n_layers, "diag": la.n_params}[prior]
    found = la._prior_spectrum(n_priors)
    assert found is not None
    gradient = found.gradient
    t = torch.linspace(-1.0, 1.5, n_priors)
    eps = 1e-6
    numeric = torch.empty(n_priors)
    for k in range(n_priors):
        shift = torch.zeros(n_priors)
        shift[k] = eps
        up = -la.log_marginal_likelihood((t + shift).exp())
        down = -la.log_marginal_likelihood((t - shift).exp())
        numeric[k] = (up - down) / (2 * eps)
    torch.testing.assert_close(gradient(t), numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize(("subset", "structure", "prior"), CONFIGS)
def test_tuned_prior_equals_autograd_adam(likelihood, subset, structure, prior):
    tuned = _fitted(likelihood, subset, structure)
    generic = _generic(_fitted(likelihood, subset, structure))
    for la in (tuned, generic):
        la.optimize_prior_precision(method="marglik", n_steps=60, prior_structure=prior)
    torch.testing.assert_close(
        tuned.prior_precision, generic.prior_precision, rtol=1e-9, atol=0
    )


def test_kron_damping_has_no_closed_form():
    la = _fitted("regression", "all", "kron", damping=True)
    assert la._prior_spectrum(1) is None


def test_adam_matches_torch_optim_adam():
    target = torch.tensor([0.3, -2.0, 5.0])

    def gradient(x):
        return 2 * (x - target) * (1 + x.square())

    x = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.1)
    lowest = x.detach().clone()
    for _ in range(50):
        optimizer.zero_grad()
        x.grad = gradient(x.detach())
        optimizer.step()
        lowest = torch.minimum(lowest, x.detach())
    ours, ours_lowest = adam(torch.zeros(3), gradient, range(50), lr=0.1)
    torch.testing.assert_close(ours, x.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_lowest, lowest, rtol=0, atol=0)


def test_leaving_positive_definite_region_reports_like_generic_path():
    # an indefinite H: small prior precisions make P indefinite, and both paths
    # must report it the same way (FullLaplace raises a ValueError)
    la = _fitted("regression", "all", "full")
    la.H = la.H - 3.0 * torch.eye(la.n_params)
    assert la._prior_spectrum(1) is not None
    with pytest.raises(ValueError, match="positive definite"):
        la.optimize_prior_precision(method="marglik", n_steps=50, lr=1.0)
