"""Curvature backends against dense torch.func ground truth (float64, tiny nets).

The reference differentiates the *batched* network output with ``jacrev`` /
``hessian`` over a flat parameter vector, an independent route from the
backends' per-sample ``vmap`` and from curvlinops' operators.
"""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from ground_truth import DenseCurvature, make_data, make_model
from torch import nn
from torch.func import functional_call, jacrev

from laplace.curvature import (
    CurvatureInterface,
    CurvlinopsEF,
    CurvlinopsGGN,
    EFInterface,
    GGNInterface,
)

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}
LIKS = [("regression", 1), ("regression", 2), ("classification", 3)]
MODELS = ["mlp", "cnn", "frozen"]
GGN_BACKENDS = [GGNInterface, CurvlinopsGGN]
EF_BACKENDS = [EFInterface, CurvlinopsEF]


class DictModel(nn.Module):
    """Takes a dict-like batch, as Hugging Face models do."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.net = make_model("mlp", n_out)

    def forward(self, batch):
        return self.net(batch["input_ids"]) * batch["scale"]


class LastLayerStub(nn.Module):
    """Minimal FeatureExtractor: ``forward_with_features`` and ``last_layer``."""

    def __init__(self, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.last_layer = nn.Linear(4, n_out, bias=bias)

    def forward_with_features(self, x):
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x):
        return self.forward_with_features(x)[0]


reference = DenseCurvature


def case(name: str, likelihood: str, n_out: int, n: int = 5):
    model = make_model(name, n_out)
    x, y = make_data(name, likelihood, n_out, n)
    return model, x, y, reference(model, x, y, likelihood)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend", GGN_BACKENDS)
def test_ggn_full_and_diag(backend, likelihood, n_out, name):
    model, x, y, ref = case(name, likelihood, n_out)
    curv = backend(model, likelihood)
    loss, H = curv.full(x, y)
    torch.testing.assert_close(H, ref.ggn, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    loss, dg = curv.diag(x, y)
    torch.testing.assert_close(dg, ref.ggn.diagonal(), **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend", EF_BACKENDS)
def test_ef_full_and_diag(backend, likelihood, n_out, name):
    model, x, y, ref = case(name, likelihood, n_out)
    curv = backend(model, likelihood)
    loss, H = curv.full(x, y)
    torch.testing.assert_close(H, ref.ef, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    loss, dg = curv.diag(x, y)
    torch.testing.assert_close(dg, ref.ef.diagonal(), **TOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_jacobians_and_gradients(likelihood, n_out, name):
    model, x, y, ref = case(name, likelihood, n_out)
    curv = CurvatureInterface(model, likelihood)
    Js, f = curv.jacobians(x)
    torch.testing.assert_close(Js, ref.J, **TOL)
    torch.testing.assert_close(f, ref.f, **TOL)
    assert not Js.requires_grad and not f.requires_grad
    Gs, loss = curv.gradients(x, y)
    torch.testing.assert_close(Gs, ref.grads, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


def test_regression_targets_of_one_dim_mean_one_output():
    model, x, y, ref = case("mlp", "regression", 1)
    loss, H = GGNInterface(model, "regression").full(x, y.squeeze(-1))
    torch.testing.assert_close(loss, ref.loss, **TOL)
    loss, _ = CurvlinopsEF(model, "regression").full(x, y.squeeze(-1))
    torch.testing.assert_close(loss, ref.loss, **TOL)


def test_jacobians_enable_backprop_differentiable_in_x():
    model = make_model("mlp", 2)
    x, _ = make_data("mlp", "regression", 2)
    x.requires_grad_(True)
    Js, f = CurvatureInterface(model, "regression").jacobians(x, enable_backprop=True)
    gx = torch.autograd.grad(Js.square().sum() + f.sum(), x)[0]

    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def objective(xx):
        def f_theta(t):
            ps = dict(
                zip([n for n, _ in shapes], t.split([s.numel() for _, s in shapes]))
            )
            ps = {n: ps[n].view(s) for n, s in shapes}
            return functional_call(model, ps, (xx,))

        return jacrev(f_theta)(theta).square().sum() + f_theta(theta).sum()

    torch.testing.assert_close(gx, torch.func.grad(objective)(x.detach()), **TOL)


@pytest.mark.parametrize(
    "bias,frozen_bias", [(True, False), (False, False), (True, True)]
)
def test_last_layer_jacobians_closed_form(bias, frozen_bias):
    model = LastLayerStub(3, bias=bias).to(DT)
    if frozen_bias:
        model.last_layer.bias.requires_grad_(False)
    x, _ = make_data("mlp", "classification", 3)
    curv = CurvatureInterface(model, "classification", last_layer=True)
    Js, f = curv.last_layer_jacobians(x)
    _, phi = model.forward_with_features(x)
    ref = reference(
        model.last_layer,
        phi.detach(),
        torch.zeros(5, dtype=torch.long),
        "classification",
    )
    torch.testing.assert_close(Js, ref.J, **TOL)
    torch.testing.assert_close(f, ref.f, **TOL)
    # The generic per-sample route on features agrees with the closed form.
    torch.testing.assert_close(curv.jacobians(phi)[0], ref.J, **TOL)


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_last_layer_curvature_on_features(backend, likelihood, n_out):
    model = LastLayerStub(n_out).to(DT)
    x, y = make_data("mlp", likelihood, n_out)
    phi = model.forward_with_features(x)[1].detach()
    ref = reference(model.last_layer, phi, y, likelihood)
    curv = backend(model, likelihood, last_layer=True)
    expected = ref.ggn if backend in GGN_BACKENDS else ref.ef
    loss, H = curv.full(phi, y)
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    torch.testing.assert_close(curv.diag(phi, y)[1], expected.diagonal(), **TOL)
    assert [p.shape for p in curv.params] == ref.shapes


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_subnetwork_restricts_curvature(backend):
    model, x, y, ref = case("mlp", "classification", 3)
    idx = torch.tensor([0, 3, 7, 12, 20, 30])
    curv = backend(model, "classification", subnetwork_indices=idx)
    expected = ref.ggn if backend in GGN_BACKENDS else ref.ef
    torch.testing.assert_close(curv.full(x, y)[1], expected[idx][:, idx], **TOL)
    torch.testing.assert_close(curv.diag(x, y)[1], expected.diagonal()[idx], **TOL)
    torch.testing.assert_close(curv.jacobians(x)[0], ref.J[..., idx], **TOL)
    torch.testing.assert_close(curv.gradients(x, y)[0], ref.grads[:, idx], **TOL)
    with pytest.raises((ValueError, NotImplementedError), match="subnetwork|Kronecker"):
        curv.kron(x, y, N=5)


def test_subnetwork_indices_validated():
    model, x, y, _ = case("mlp", "regression", 1)
    with pytest.raises(ValueError, match="subnetwork_indices"):
        GGNInterface(model, "regression", subnetwork_indices=torch.tensor([0.5]))
    curv = GGNInterface(model, "regression", subnetwork_indices=torch.tensor([0, 99]))
    with pytest.raises(ValueError, match=r"\[0, 21\)"):
        curv.diag(x, y)


@pytest.mark.parametrize("mapping", [dict, UserDict])
@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_dict_like_inputs(backend, mapping):
    model = DictModel(3).to(DT)
    x, y = make_data("mlp", "classification", 3)
    batch = mapping({"input_ids": x, "scale": 2.0})
    ref = reference(model, batch, y, "classification")
    curv = backend(model, "classification")
    expected = ref.ggn if backend in GGN_BACKENDS else ref.ef
    torch.testing.assert_close(curv.full(batch, y)[1], expected, **TOL)
    torch.testing.assert_close(curv.diag(batch, y)[1], expected.diagonal(), **TOL)
    torch.testing.assert_close(curv.jacobians(batch)[0], ref.J, **TOL)
    if backend in (CurvlinopsGGN, CurvlinopsEF):
        # With scale 1 the dict model is its inner net on the tensor input.
        batch["scale"] = 1.0
        _, kron = curv.kron(batch, y, N=5)
        _, expected = backend(model.net, "classification").kron(x, y, N=5)
        for b, b_ref in zip(kron.kfacs, expected.kfacs, strict=True):
            for F, F_ref in zip(b, b_ref, strict=True):
                torch.testing.assert_close(F, F_ref, **TOL)


def test_stochastic_diag_equals_diagonal_of_stochastic_full():
    """Same generator state -> same sampled labels, so the matrix-free diagonal
    must match the diagonal of the Jacobian-based MC Fisher exactly."""
    model, x, y, _ = case("mlp", "classification", 3)
    kw = {"stochastic": True, "num_samples": 4}
    full = GGNInterface(
        model, "classification", generator=torch.Generator().manual_seed(3), **kw
    )
    diag = GGNInterface(
        model, "classification", generator=torch.Generator().manual_seed(3), **kw
    )
    torch.testing.assert_close(diag.diag(x, y)[1], full.full(x, y)[1].diagonal(), **TOL)


@pytest.mark.parametrize("backend", GGN_BACKENDS)
@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
def test_stochastic_fisher_is_unbiased(backend, likelihood, n_out):
    """MC Fisher is random: check PSD/symmetry exactly and, with many samples,
    closeness to the exact GGN (relative Frobenius error ~ 1/sqrt(samples))."""
    model, x, y, ref = case("mlp", likelihood, n_out)
    gen = torch.Generator().manual_seed(0)
    curv = backend(model, likelihood, stochastic=True, num_samples=4000, generator=gen)
    loss, H = curv.full(x, y)
    torch.testing.assert_close(H, H.T, **TOL)
    assert torch.linalg.eigvalsh(H).min() > -1e-10
    assert (H - ref.ggn).norm() / ref.ggn.norm() < 0.1
    torch.testing.assert_close(loss, ref.loss, **TOL)


def test_base_and_generic_interfaces_raise_for_missing_structures():
    model, x, y, _ = case("mlp", "regression", 1)
    for method, args in [("full", (x, y)), ("diag", (x, y)), ("kron", (x, y, 5))]:
        with pytest.raises(NotImplementedError, match="CurvlinopsGGN"):
            getattr(CurvatureInterface(model, "regression"), method)(*args)
    with pytest.raises(NotImplementedError, match="CurvlinopsGGN"):
        GGNInterface(model, "regression").kron(x, y, 5)
    with pytest.raises(NotImplementedError, match="CurvlinopsEF"):
        EFInterface(model, "regression").kron(x, y, 5)
    with pytest.raises(ValueError, match="likelihood"):
        GGNInterface(model, "poisson")
    with pytest.raises(ValueError, match="num_samples"):
        GGNInterface(model, "regression", stochastic=True, num_samples=0)
    with pytest.warns(UserWarning, match="unknown_option"):
        GGNInterface(model, "regression", unknown_option=1)


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_model_left_untouched(backend):
    model, x, y, _ = case("frozen", "classification", 3)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    curv = backend(model, "classification")
    curv.full(x, y)
    curv.diag(x, y)
    if backend in (CurvlinopsGGN, CurvlinopsEF):
        curv.kron(x, y, N=5)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert (
            not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_float32_follows_model_dtype(backend):
    model = make_model("mlp", 3).float()
    x, y = make_data("mlp", "classification", 3)
    curv = backend(model, "classification")
    loss, H = curv.full(x.float(), y)
    assert H.dtype == loss.dtype == torch.float32
    assert curv.diag(x.float(), y)[1].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_cuda_matches_cpu(backend):
    model, x, y, ref = case("cnn", "classification", 3)
    curv = backend(model.cuda(), "classification")
    expected = ref.ggn if backend in GGN_BACKENDS else ref.ef
    loss, H = curv.full(x.cuda(), y.cuda())
    assert H.device.type == "cuda"
    torch.testing.assert_close(H.cpu(), expected, **TOL)
    torch.testing.assert_close(
        curv.diag(x.cuda(), y.cuda())[1].cpu(), expected.diagonal(), **TOL
    )
