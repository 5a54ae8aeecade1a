"""The exact-GGN routes from layer factors (``laplace.parametric.layer_curvature``)
against dense ground truth built with torch.func in float64: the routes on a
bare linear layer, the Kronecker-product route of
the dense GGN, seed-chunked KFAC of convolutions, and the single forward pass per
batch of a last-layer fit."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature._loss_sqrt import exact_sqrt, exact_sqrt_fn
from laplace.parametric.layer_curvature import (
    diag_ggn_by_layers,
    full_ggn_by_layers,
    kron_ggn_by_layers,
)
from laplace.utils.enums import Likelihood

# float32 models: the routes compute in the model's dtype, so the comparison with
# the float64 truth is only as tight as float32 round-off
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
}
LIKS = [("classification", 3), ("regression", 2), ("regression", 1)]
BUDGET = 50  # tiny chunks: the chunked sums must equal one-shot sums


def _loss_hessian(f, likelihood):
    """``Lambda (batch, C, C)`` in closed form."""
    if likelihood == "regression":
        return torch.eye(f.shape[1]).expand(len(f), -1, -1)
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _truth_ggn(model, x, likelihood):
    """Dense GGN ``(P, P)`` of the trainable parameters, in float64."""
    model = model.double()
    x = x.double()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)
    Lam = _loss_hessian(model(x).detach(), likelihood)
    return torch.einsum("nop,noq,nqr->pr", J, Lam, J)


def _route_args(model, likelihood):
    params = [p for p in model.parameters() if p.requires_grad]
    roots = partial(exact_sqrt, likelihood=Likelihood.parse(likelihood, "likelihood"))
    return params, roots


def _data(shape, n, dtype):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(dtype)


def _linear(n_in, n_out, bias, frozen, dtype):
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    if frozen == "weight":
        layer.weight.requires_grad_(False)
    elif frozen == "bias" and bias:
        layer.bias.requires_grad_(False)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize(
    "bias,frozen", [(True, None), (False, None), (True, "weight"), (True, "bias")]
)
def test_bare_linear_full_and_diag(dtype, likelihood, n_out, bias, frozen):
    """A bare ``nn.Linear`` through the generic layer-factor routes (last-layer
    Laplace takes the closed form of ``tests/test_last_layer_ggn.py``) and, with
    several outputs, the Kronecker-product dense route."""
    layer = _linear(5, n_out, bias, frozen, dtype)
    x = _data((5,), 13, dtype)
    params, roots = _route_args(layer, likelihood)
    truth = _truth_ggn(_linear(5, n_out, bias, frozen, dtype), x, likelihood)
    f, H = full_ggn_by_layers(layer, params, x, roots, BUDGET, dtype)
    assert H.dtype == dtype and H.shape == truth.shape
    torch.testing.assert_close(H.double(), truth, **TOL[dtype])
    torch.testing.assert_close(f, layer(x).detach(), rtol=0, atol=0)
    _, d = diag_ggn_by_layers(layer, params, x, roots, BUDGET, dtype)
    torch.testing.assert_close(d.double(), truth.diagonal(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("bias", [True, False])
def test_bare_linear_kron(dtype, likelihood, n_out, bias):
    """KFAC of the last layer: ``G = sum_n Lambda_n``, ``A = sum_n a a^T / N``."""
    layer = _linear(4, n_out, bias, None, dtype)
    x = _data((4,), 11, dtype)
    params, roots = _route_args(layer, likelihood)
    N = 40
    _, K = kron_ggn_by_layers(layer, params, x, roots, N, dtype)
    x64 = x.double()
    G = _loss_hessian(layer.double()(x64).detach(), likelihood).sum(0)
    A = x64.T @ x64 / N
    expected = [[G, A]] + ([[G]] if bias else [])
    assert len(K.kfacs) == len(expected)
    for got, want in zip(K.kfacs, expected):
        for F_got, F_want in zip(got, want):
            assert F_got.dtype == dtype
            torch.testing.assert_close(F_got.double(), F_want, **TOL[dtype])


def _mlp(n_out, dtype, frozen):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, n_out)).to(dtype)
    if frozen == "first_bias":
        model[0].bias.requires_grad_(False)
    elif frozen == "last_weight":
        model[2].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("frozen", [None, "first_bias", "last_weight"])
def test_mlp_full_ggn_with_cross_blocks(dtype, likelihood, n_out, frozen):
    """Several single-position layers: diagonal and cross-layer blocks of the
    Kronecker-product route, in the order of the treated parameters."""
    model = _mlp(n_out, dtype, frozen)
    x = _data((3,), 9, dtype)
    params, roots = _route_args(model, likelihood)
    truth = _truth_ggn(_mlp(n_out, dtype, frozen), x, likelihood)
    _, H = full_ggn_by_layers(model, params, x, roots, BUDGET, dtype)
    torch.testing.assert_close(H.double(), truth, **TOL[dtype])


class _ConvNet(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, n_out)

    def forward(self, x, eps=None):
        s1 = self.conv1(x)
        if eps is not None:
            s1 = s1 + eps[0]
        h = F.max_pool2d(F.relu(s1), 2, stride=1)  # 5x5 -> 4x4
        s2 = self.conv2(h)
        if eps is not None:
            s2 = s2 + eps[1]
        return self.fc(torch.tanh(s2).flatten(1))


def _patches(x, k, stride, pad):
    """``(batch, C_in k k, positions)`` by explicit slicing (no unfold)."""
    xp = F.pad(x, (pad,) * 4)
    H_out = (xp.shape[2] - k) // stride + 1
    cols = [
        xp[:, :, i : i + stride * H_out : stride, j : j + stride * H_out : stride]
        for i in range(k)
        for j in range(k)
    ]
    P = torch.stack(cols, dim=2)  # (batch, C_in, k*k, H_out, W_out)
    return P.flatten(1, 2).flatten(2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
def test_conv_kron_factors(dtype, likelihood, n_out):
    """KFAC of convolutions, seeds backpropagated one at a time: ``G`` from the
    output gradients ``d f / d s`` (differentiating an additive perturbation of
    each layer output), ``A`` from explicitly sliced patches."""
    torch.manual_seed(2)
    model = _ConvNet(n_out).to(dtype)
    x = _data((2, 5, 5), 6, dtype)
    params, roots = _route_args(model, likelihood)
    N = 20
    _, K = kron_ggn_by_layers(model, params, x, roots, N, dtype)

    ref = _ConvNet(n_out).double()
    ref.load_state_dict(model.state_dict())
    x64 = x.double()
    eps = [torch.zeros(6, 3, 5, 5), torch.zeros(6, 4, 2, 2)]
    jac = jacrev(lambda e: ref(x64, e))(eps)  # per layer (batch, C, batch, *s)
    f = ref(x64).detach()
    Lam = _loss_hessian(f, likelihood)
    h = F.max_pool2d(F.relu(ref.conv1(x64)), 2, stride=1).detach()
    inputs = [(x64, 3, 1, 1), (h, 2, 2, 0)]
    expected = []
    for J, (a_in, k, stride, pad) in zip(jac, inputs):
        J = torch.diagonal(J, dim1=0, dim2=2).movedim(-1, 0).flatten(3)
        # G = sum_{n, t} J_nt^T Lambda_n J_nt with J_nt (C, out): no root needed
        G = torch.einsum("nopt,noq,nqrt->pr", J, Lam, J)
        a = _patches(a_in, k, stride, pad)  # (batch, in, T)
        A = torch.einsum("nit,njt->ij", a, a) / (N * a.shape[2])
        expected += [[G, A], [G]]
    # the output layer's output gradients are the roots: G = sum_n Lambda_n
    fc_a = torch.tanh(ref.conv2(h)).flatten(1).detach()
    expected += [[Lam.sum(0), fc_a.T @ fc_a / N], [Lam.sum(0)]]
    for got, want in zip(K.kfacs, expected, strict=True):
        for F_got, F_want in zip(got, want, strict=True):
            torch.testing.assert_close(F_got.double(), F_want, **TOL[dtype])


@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_batched_roots_match_per_sample_roots(likelihood, n_out):
    f = torch.randn(7, n_out)
    lik = Likelihood.parse(likelihood, "likelihood")
    L = exact_sqrt(f, lik)
    expected = torch.stack([exact_sqrt_fn(lik)(f_n) for f_n in f])
    torch.testing.assert_close(L, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(
        L @ L.mT, _loss_hessian(f, likelihood), rtol=0, atol=1e-14
    )


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("last_layer_name", [None, "2"])
def test_last_layer_fit_runs_one_forward_pass_per_batch(structure, last_layer_name):
    """Finding the last layer and the number of outputs reuses the features of
    the first batch: one forward pass per batch, same posterior as a fit whose
    passes are all fresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    X = torch.randn(30, 3)
    y = torch.randint(4, (30,))
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    kwargs = dict(subset_of_weights="last_layer", hessian_structure=structure)
    la = Laplace(model, "classification", last_layer_name=last_layer_name, **kwargs)
    calls = []
    la.model.model[0].register_forward_hook(lambda *_: calls.append(1))
    la.fit(loader)
    assert len(calls) == len(loader)
    # a second fit finds nothing to reuse from the first one
    calls.clear()
    la.fit(loader)
    assert len(calls) == len(loader)
    phi = torch.relu(model[0](X)).detach()
    truth = _truth_ggn(model[2], phi, "classification")
    P = la.posterior_precision
    if structure == "full":
        torch.testing.assert_close(
            P, truth + torch.eye(len(truth)), rtol=1e-9, atol=1e-11
        )
    elif structure == "diag":
        torch.testing.assert_close(P, truth.diagonal() + 1, rtol=1e-9, atol=1e-11)


def test_find_last_layer_with_features_matches_forward_with_features():
    from laplace.utils.feature_extractor import FeatureExtractor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    fe = FeatureExtractor(model)
    out, phi = fe.find_last_layer_with_features(x)
    assert fe.last_layer is model[2]
    out2, phi2 = fe.forward_with_features(x)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(phi, phi2, rtol=0, atol=0)
    assert not phi.requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 0)),
        dict(kernel_size=3, padding="valid", stride=2),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_patches_match_unfold(kwargs, channels_last):
    from laplace.parametric.layer_factors import _patches

    conv = nn.Conv2d(2, 3, **kwargs)
    x = torch.randn(4, 2, 7, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    padding = 0 if conv.padding == "valid" else conv.padding
    expected = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
    torch.testing.assert_close(_patches(conv, x), expected, rtol=0, atol=0)
    # the patches reproduce the convolution
    out = conv.weight.flatten(1) @ _patches(conv, x) + conv.bias[:, None]
    torch.testing.assert_close(
        out.reshape(conv(x).shape), conv(x), rtol=1e-12, atol=1e-12
    )


def test_seed_loop_when_the_batched_backward_fails(monkeypatch):
    """An operation without a vmap batching rule for its backward: the seeds are
    backpropagated one at a time, with the same result."""
    grad = torch.autograd.grad

    def no_batching(*args, is_grads_batched=False, **kwargs):
        if is_grads_batched:
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    model = _mlp(3, torch.float64, None)
    x = _data((3,), 9, torch.float64)
    params, roots = _route_args(model, "classification")
    truth = _truth_ggn(_mlp(3, torch.float64, None), x, "classification")
    _, d = diag_ggn_by_layers(model, params, x, roots, BUDGET, torch.float64)
    torch.testing.assert_close(d, truth.diagonal(), **TOL[torch.float64])
