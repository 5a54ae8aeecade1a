"""CUDA runs of every structure equal the CPU runs (float64).

Skipped without a CUDA device (see conftest.py). Model and data live on the GPU;
every result must come back on the GPU and match the CPU result.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

pytestmark = pytest.mark.gpu

RTOL = 1e-8  # different BLAS/cuSOLVER kernels, float64


def problem(likelihood, n_out, conv):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 6 * 6, n_out),
        )
        shape = (1, 6, 6)
    else:
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, n_out))
        shape = (3,)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, *shape, generator=gen)
    if likelihood == "classification":
        y = torch.randint(n_out, (40,), generator=gen)
    else:
        y = torch.randn(40, n_out, generator=gen)
    return model.double(), X.double(), y if y.dtype == torch.long else y.double()


def results(model, X, y, likelihood, key, device):
    model = copy.deepcopy(model).to(device)
    X, y = X.to(device), y.to(device)
    la = Laplace(model, likelihood, *key, prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
    P = la.posterior_precision
    dense = P.to_matrix() if hasattr(P, "to_matrix") else P
    la.optimize_prior_precision(method="marglik", n_steps=20)
    X_test = X[:7]
    f_mu, f_var = la._glm_predictive_distribution(X_test)
    _, f_diag = la._glm_predictive_distribution(X_test, diagonal_output=True)
    gen = torch.Generator(device=device).manual_seed(0)
    nn_out = la(X_test, pred_type="nn", link_approx="mc", n_samples=5, generator=gen)
    out = {
        "precision": dense,
        "marglik": la.log_marginal_likelihood(),
        "prior": la.prior_precision,
        "f_mu": f_mu,
        "f_var": f_var,
        "f_diag": f_diag,
        "nn_shape": torch.tensor(
            (nn_out if isinstance(nn_out, torch.Tensor) else nn_out[0]).shape
        ),
    }
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize(
    "likelihood,n_out,conv",
    [
        ("classification", 3, False),
        ("regression", 2, False),
        ("classification", 3, True),
    ],
)
def test_cuda_matches_cpu(structure, subset, likelihood, n_out, conv):
    model, X, y = problem(likelihood, n_out, conv)
    key = (subset, structure)
    cpu = results(model, X, y, likelihood, key, torch.device("cpu"))
    gpu = results(model, X, y, likelihood, key, torch.device("cuda"))
    for name, value in gpu.items():
        if name == "nn_shape":
            assert torch.equal(value, cpu[name])
            continue
        assert value.device.type == "cuda", name
        torch.testing.assert_close(
            value.cpu(), cpu[name], rtol=RTOL, atol=1e-10, msg=name
        )


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_cuda_float32_model_keeps_dtype_and_device(structure):
    model, X, y = problem("classification", 3, conv=True)
    model, X = model.float().cuda(), X.float().cuda()
    la = Laplace(model, "classification", "all", structure)
    la.fit(DataLoader(TensorDataset(X, y.cuda()), batch_size=16))
    probs = la(X[:5])
    assert probs.device.type == "cuda" and probs.dtype == torch.float32
    torch.testing.assert_close(
        probs.sum(-1),
        torch.ones(5, device="cuda", dtype=torch.float32),
        rtol=1e-5,
        atol=1e-5,
    )
