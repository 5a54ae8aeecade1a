"""End to end: Laplace fits with the BackPACK and ASDL backends give the same
log marginal likelihood as with the curvlinops backends where both are exact
(or, for KFAC on linear layers, the same approximation)."""

from __future__ import annotations

import pytest
import torch
from test_backends import make_data, make_model
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)

TOL = {"rtol": 1e-8, "atol": 1e-8}
CASES = [
    (BackPackGGN, CurvlinopsGGN, "full"),
    (BackPackGGN, CurvlinopsGGN, "diag"),
    (BackPackGGN, CurvlinopsGGN, "kron"),
    (AsdlGGN, CurvlinopsGGN, "full"),
    (AsdlGGN, CurvlinopsGGN, "diag"),
    (AsdlGGN, CurvlinopsGGN, "kron"),
    (BackPackEF, CurvlinopsEF, "full"),
    (BackPackEF, CurvlinopsEF, "diag"),
    (AsdlEF, CurvlinopsEF, "full"),
    (AsdlEF, CurvlinopsEF, "diag"),
    (AsdlEF, CurvlinopsEF, "kron"),
    (AsdlHessian, CurvlinopsHessian, "full"),
]


def fitted_marglik(backend, likelihood, n_out, subset, structure, name="mlp"):
    model = make_model(name, n_out)
    x, y = make_data(name, likelihood, n_out, n=7)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # batches 3, 3, 1
    kwargs = {"sigma_noise": 0.7} if likelihood == "regression" else {}
    la = Laplace(
        model,
        likelihood,
        subset,
        structure,
        backend=backend,
        # the Hessian is indefinite away from a minimum: a stronger prior
        prior_precision=20.0 if backend in (AsdlHessian, CurvlinopsHessian) else 0.5,
        **kwargs,
    )
    la.fit(loader)
    return la.log_marginal_likelihood()


@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
@pytest.mark.parametrize("backend,reference,structure", CASES)
def test_all_weights(backend, reference, structure, likelihood, n_out):
    value = fitted_marglik(backend, likelihood, n_out, "all", structure)
    expected = fitted_marglik(reference, likelihood, n_out, "all", structure)
    torch.testing.assert_close(value, expected, **TOL)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", [BackPackGGN, AsdlGGN])
def test_all_weights_frozen_layer(backend, structure):
    value = fitted_marglik(backend, "classification", 3, "all", structure, "frozen")
    expected = fitted_marglik(
        CurvlinopsGGN, "classification", 3, "all", structure, "frozen"
    )
    torch.testing.assert_close(value, expected, **TOL)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("backend", [BackPackGGN, AsdlGGN])
def test_last_layer(backend, structure):
    value = fitted_marglik(backend, "classification", 3, "last_layer", structure)
    expected = fitted_marglik(
        CurvlinopsGGN, "classification", 3, "last_layer", structure
    )
    torch.testing.assert_close(value, expected, **TOL)
