"""Exact GGN of a last linear layer in closed form in the loss Hessian
(``laplace.parametric.last_layer_ggn``): against the dense torch.func GGN, and
memory that grows like ``P^2 + batch * P``, not ``batch * C^2 * D^2``."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.parametric.last_layer_ggn import linear_layer_ggn
from laplace.utils.enums import Likelihood
from tests.ground_truth import dense_ggn, output_hessians, tiny_loader, tiny_net

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
}
LIKS = [("classification", 4), ("classification", 2), ("regression", 3)]


def _layer(n_in, n_out, bias, frozen, dtype):
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    if frozen:
        getattr(layer, frozen).requires_grad_(False)
    return layer


def _truth(layer, x, likelihood):
    """``(P, P)`` dense GGN of the trainable parameters, float64."""
    layer = layer.double()
    x = x.double()
    named = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    jac = jacrev(lambda p: functional_call(layer, p, (x,)))(named)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)
    lam = output_hessians(layer(x).detach(), likelihood)
    return torch.einsum("nop,noq,nqr->pr", J, lam, J)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize(
    "bias,frozen", [(True, None), (False, None), (True, "weight"), (True, "bias")]
)
@pytest.mark.parametrize("budget", [7, 2**20])  # chunked and one-shot rank-one sums
def test_full_and_diag_match_dense_ggn(dtype, likelihood, n_out, bias, frozen, budget):
    layer = _layer(5, n_out, bias, frozen, dtype)
    x = torch.randn(13, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    truth = _truth(_layer(5, n_out, bias, frozen, dtype), x, likelihood)
    lik = Likelihood.parse(likelihood, "likelihood")
    f, H = linear_layer_ggn(layer, params, x, lik, "full", 13, budget, dtype)
    assert H.dtype == dtype and H.shape == truth.shape
    torch.testing.assert_close(H.double(), truth, **TOL[dtype])
    torch.testing.assert_close(f, layer(x).detach(), rtol=0, atol=0)
    _, d = linear_layer_ggn(layer, params, x, lik, "diag", 13, budget, dtype)
    torch.testing.assert_close(d.double(), truth.diagonal(), **TOL[dtype])


@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("bias", [True, False])
def test_kron_factors(likelihood, n_out, bias):
    """``G = sum_n Lambda_n`` (dense truth), ``A = sum_n a a^T / N``."""
    layer = _layer(4, n_out, bias, None, torch.float64)
    x = torch.randn(11, 4, generator=torch.Generator().manual_seed(3))
    params = list(layer.parameters())
    lik = Likelihood.parse(likelihood, "likelihood")
    _, K = linear_layer_ggn(layer, params, x, lik, "kron", 40, 100, torch.float64)
    G = output_hessians(layer(x).detach(), likelihood).sum(0)
    expected = [[G, x.T @ x / 40]] + ([[G]] if bias else [])
    assert len(K.kfacs) == len(expected)
    for got, want in zip(K.kfacs, expected):
        for F_got, F_want in zip(got, want):
            torch.testing.assert_close(F_got, F_want, **TOL[torch.float64])


@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_last_layer_laplace_matches_dense_ggn(likelihood, n_out, structure):
    loader, X = tiny_loader(likelihood, n_out)
    la = Laplace(tiny_net(n_out), likelihood, "last_layer", structure)
    la.fit(loader)
    truth = dense_ggn(tiny_net(n_out), X, likelihood, last_layer=True)
    expected = truth if structure == "full" else truth.diagonal()
    torch.testing.assert_close(la.H, expected, rtol=1e-10, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.layer_factor_fit
def test_memory_grows_like_p_squared_not_classes_squared():
    """Many classes on few features: no intermediate beyond the ``(P, P)``
    result and ``(batch, P)`` chunks. The Kronecker-product route held ``batch *
    C * C(C+1)/2`` seed products (64 GB at 1000 classes) and the roots ``batch *
    C^2``."""
    C, D, n = 60, 3, 32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, D), nn.Tanh(), nn.Linear(D, C))
    X = torch.randn(n, 2)
    y = torch.randint(C, (n,))
    la = Laplace(model, "classification", "last_layer", "full")
    guard = _LargestTensor()
    with guard:
        la.fit(DataLoader(TensorDataset(X, y), batch_size=n))
    P = C * (D + 1)
    assert la.H.shape == (P, P)
    assert guard.largest <= P * P + n * P
    truth = dense_ggn(model, X, "classification", last_layer=True)
    torch.testing.assert_close(la.H, truth, rtol=1e-10, atol=1e-12)
