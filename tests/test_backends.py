"""BackPACK and ASDL backends against dense torch.func ground truth (float64).

The reference differentiates the *batched* network output w.r.t. one flat
parameter vector, row by row with ``torch.autograd.grad`` (Jacobians,
per-sample gradients) and with ``torch.func.hessian``: independent of
BackPACK's and ASDL's hooks and of the per-sample ``vmap`` of the torch.func
backends.
Shared helpers here are imported by the other ``test_backend_*`` files.
"""

from __future__ import annotations

import functools
from collections import UserDict

import pytest
import torch
from ground_truth import DenseCurvature, make_data, make_model
from torch import nn
from torch.func import jacrev

from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
)

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}
LIKS = [("regression", 1), ("regression", 2), ("classification", 3)]
MODELS = ["mlp", "cnn", "frozen"]
GGN_BACKENDS = [BackPackGGN, AsdlGGN]
EF_BACKENDS = [BackPackEF, AsdlEF]
# (backend, structure) pairs that are exact: compared to the reference.
EXACT = [
    (BackPackGGN, "full"),
    (BackPackGGN, "diag"),
    (AsdlGGN, "full"),
    (AsdlGGN, "diag"),
    (BackPackEF, "full"),
    (BackPackEF, "diag"),
    (AsdlEF, "full"),
    (AsdlEF, "diag"),
    (AsdlHessian, "full"),
]


class Reference(DenseCurvature):
    """Jacobians row by row with ``torch.autograd.grad``: independent of the
    per-sample ``vmap`` of the torch.func backends."""

    @staticmethod
    def jacobian(fn, theta: torch.Tensor) -> torch.Tensor:
        return _rows_jacobian(fn, theta)

    def matrix(self, backend: type) -> torch.Tensor:
        if backend is AsdlHessian:
            return self.hess
        return self.ggn if backend in GGN_BACKENDS else self.ef


def _rows_jacobian(fn, theta: torch.Tensor) -> torch.Tensor:
    """Jacobian `(*out_shape, P)` of ``fn(theta)``, one backward pass per entry."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(theta)
        rows = [
            torch.autograd.grad(o, theta, retain_graph=True)[0] for o in out.flatten()
        ]
    return torch.stack(rows).reshape(*out.shape, -1).detach()


@functools.cache
def case(name: str, likelihood: str, n_out: int, n: int = 5):
    """Model, data and reference; cached (the backends leave models unchanged)."""
    model = make_model(name, n_out)
    x, y = make_data(name, likelihood, n_out, n)
    return model, x, y, Reference(model, x, y, likelihood)


def kron_dense(kron) -> torch.Tensor:
    """Block-diagonal dense matrix of Kron blocks ``[G, A]`` / ``[G]``."""
    return torch.block_diag(
        *[torch.kron(*b) if len(b) == 2 else b[0] for b in kron.kfacs]
    )


def block_diagonal(H: torch.Tensor, shapes) -> torch.Tensor:
    """Only the per-parameter diagonal blocks of ``H``."""
    blocks, start = [], 0
    for s in shapes:
        blocks.append(H[start : start + s.numel(), start : start + s.numel()])
        start += s.numel()
    return torch.block_diag(*blocks)


class DictModel(nn.Module):
    """Takes a dict-like batch, as Hugging Face models do."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        self.net = make_model("mlp", n_out)

    def forward(self, batch):
        return self.net(batch["input_ids"])


class LastLayerStub(nn.Module):
    """Minimal FeatureExtractor: ``forward_with_features`` and ``last_layer``."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DT)
        self.last_layer = nn.Linear(4, n_out).to(DT)

    def forward_with_features(self, x):
        phi = self.body(x)
        return self.last_layer(phi), phi

    def forward(self, x):
        return self.forward_with_features(x)[0]


# -- exact structures ------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend,structure", EXACT)
def test_exact_structures(backend, structure, likelihood, n_out, name):
    model, x, y, ref = case(name, likelihood, n_out)
    loss, H = getattr(backend(model, likelihood), structure)(x, y)
    expected = ref.matrix(backend)
    expected = expected if structure == "full" else expected.diagonal()
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("backend,structure", EXACT)
def test_subnetwork(backend, structure):
    model, x, y, ref = case("mlp", "classification", 3)
    idx = torch.tensor([1, 5, 9, 22])
    _, H = getattr(backend(model, "classification", subnetwork_indices=idx), structure)(
        x, y
    )
    expected = ref.matrix(backend)[idx][:, idx]
    expected = expected if structure == "full" else expected.diagonal()
    torch.testing.assert_close(H, expected, **TOL)


@pytest.mark.parametrize("backend,structure", EXACT)
def test_last_layer(backend, structure):
    """With ``last_layer=True`` only the last layer is differentiated, on features."""
    model = LastLayerStub(2)
    x, y = make_data("mlp", "regression", 2)
    phi = model.body(x).detach()
    ref = Reference(model.last_layer, phi, y, "regression")
    loss, H = getattr(backend(model, "regression", last_layer=True), structure)(phi, y)
    expected = ref.matrix(backend)
    expected = expected if structure == "full" else expected.diagonal()
    torch.testing.assert_close(H, expected, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", [AsdlGGN, AsdlEF])
def test_asdl_dict_inputs(backend, structure):
    model = DictModel(3)
    x, y = make_data("mlp", "classification", 3)
    ref = Reference(model.net, x, y, "classification")
    batch = UserDict({"input_ids": x, "labels": y})
    _, H = getattr(backend(model, "classification"), structure)(batch, y)
    expected = ref.matrix(backend)
    expected = expected if structure == "full" else expected.diagonal()
    torch.testing.assert_close(H, expected, **TOL)


# -- Jacobians and gradients -----------------------------------------------------
# The EF classes share their Jacobians with the GGN classes of the same library.
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("backend", GGN_BACKENDS)
def test_jacobians(backend, n_out, name):
    model, x, y, ref = case(name, "regression", n_out)
    curv = backend(model, "regression")
    Js, f = curv.jacobians(x)
    torch.testing.assert_close(Js, ref.J, **TOL)
    torch.testing.assert_close(f, ref.f, **TOL)
    assert not Js.requires_grad


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_jacobians_differentiable_in_input(backend):
    """``enable_backprop``: Jacobians and outputs carry the graph to ``x``."""
    model, x, y, ref = case("mlp", "classification", 3)
    x = x.clone().requires_grad_(True)
    Js, f = backend(model, "classification").jacobians(x, enable_backprop=True)
    torch.testing.assert_close(Js.detach(), ref.J, **TOL)
    (g,) = torch.autograd.grad(Js.square().sum(), x)
    # the same function of x through the reference route
    x_ref = x.detach().clone().requires_grad_(True)
    J_ref = jacrev(Reference(model, x_ref, y, "classification").f_of)(ref.theta)
    (g_ref,) = torch.autograd.grad(J_ref.square().sum(), x_ref)
    torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("backend", GGN_BACKENDS + EF_BACKENDS)
def test_last_layer_jacobians(backend):
    model = LastLayerStub(3)
    x, y = make_data("mlp", "classification", 3)
    phi = model.body(x).detach()
    ref = Reference(model.last_layer, phi, y, "classification")
    Js, f = backend(model, "classification", last_layer=True).last_layer_jacobians(x)
    torch.testing.assert_close(Js, ref.J, **TOL)
    torch.testing.assert_close(f, ref.f, **TOL)


# AsdlEF's per-sample gradients are the torch.func ones of EFInterface.
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_gradients(likelihood, n_out, name):
    backend = BackPackEF
    model, x, y, ref = case(name, likelihood, n_out)
    Gs, loss = backend(model, likelihood).gradients(x, y)
    torch.testing.assert_close(Gs, ref.grads, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)
