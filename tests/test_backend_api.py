"""Curvature-backend API (issue 13.11): per-call keywords of CurvlinopsGGN/EF
``kron``/``full``, ``functorch_jacobians`` and ``selected_output_jacobians``
against torch.func, ASDL's ``loss_type`` and ``symeig`` reading the upper
triangle."""

import pytest
import torch
from ground_truth import DenseCurvature, make_data, make_model
from torch import nn

from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)
from laplace.utils import symeig


class SharedLinear(nn.Module):
    """A Linear on every position of ``(batch, T, D)`` inputs, summed over T:
    KFAC 'expand' and 'reduce' differ on it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)).sum(1))


def _sequences(likelihood, n=6):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, 5, 3, generator=gen, dtype=torch.float64)
    if likelihood == "regression":
        return x, torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x, torch.randint(2, (n,), generator=gen)


def _factors(kron):
    return [F for block in kron.kfacs for F in block]


def _assert_same_kron(a, b):
    for F, H in zip(_factors(a), _factors(b), strict=True):
        torch.testing.assert_close(F, H, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF])
def test_kron_forwards_kfac_approx_per_call(backend, likelihood):
    model = SharedLinear().double()
    x, y = _sequences(likelihood)
    default = backend(model, likelihood)
    loss_e, expand = default.kron(x, y, N=10)
    loss_r, reduce = default.kron(x, y, N=10, kfac_approx="reduce")
    _, reduce_ref = backend(model, likelihood, kfac_approx="reduce").kron(x, y, N=10)
    _assert_same_kron(reduce, reduce_ref)
    _, expand_ref = backend(model, likelihood, kfac_approx="reduce").kron(
        x, y, N=10, kfac_approx="expand"
    )
    _assert_same_kron(expand, expand_ref)
    assert max((F - H).abs().max() for F, H in zip(_factors(expand), _factors(reduce)))
    torch.testing.assert_close(loss_e, loss_r)
    assert default.kfac_approx == "expand"  # the constructor's value is kept


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("method", ["kron", "full", "diag"])
def test_ggn_forwards_mc_samples_per_call(method, likelihood):
    model = make_model("mlp", 3)
    x, y = make_data("mlp", likelihood, 3)
    args = (x, y, 5) if method == "kron" else (x, y)

    def run(num_samples, **call):
        gen = torch.Generator().manual_seed(4)
        curv = CurvlinopsGGN(
            model, likelihood, stochastic=True, num_samples=num_samples, generator=gen
        )
        return getattr(curv, method)(*args, **call)[1]

    per_call, constructed, one = run(1, mc_samples=7), run(7), run(1)
    as_list = (lambda K: _factors(K)) if method == "kron" else (lambda H: [H])
    for F, H in zip(as_list(per_call), as_list(constructed), strict=True):
        torch.testing.assert_close(F, H, rtol=1e-12, atol=1e-14)
    assert max((F - H).abs().max() for F, H in zip(as_list(per_call), as_list(one)))


@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF, CurvlinopsHessian])
def test_unknown_or_meaningless_keywords_raise(backend):
    model = make_model("mlp", 3)
    x, y = make_data("mlp", "classification", 3)
    curv = backend(model, "classification")
    methods = {"full": (x, y), "kron": (x, y, 5), "diag": (x, y)}
    if backend is CurvlinopsHessian:
        methods = {"full": (x, y)}
    for method, args in methods.items():
        with pytest.raises(TypeError, match=f"{method}\\(\\) got unexpected.*'foo'"):
            getattr(curv, method)(*args, foo=1)
    with pytest.raises(TypeError, match="kfac_approx"):
        curv.full(x, y, kfac_approx="reduce")  # a KFAC option
    if backend is not CurvlinopsHessian:
        with pytest.raises(ValueError, match="kfac_approx='sideways'"):
            curv.kron(x, y, 5, kfac_approx="sideways")
    if backend is CurvlinopsGGN:
        with pytest.raises(ValueError, match="stochastic=True"):
            curv.kron(x, y, 5, mc_samples=3)  # exact GGN draws no samples
        stochastic = backend(model, "classification", stochastic=True)
        with pytest.raises(ValueError, match="mc_samples must be a positive int"):
            stochastic.full(x, y, mc_samples=0)
    elif backend is CurvlinopsEF:
        with pytest.raises(TypeError, match="mc_samples"):
            curv.kron(x, y, 5, mc_samples=3)


# ---- Jacobians ---------------------------------------------------------------------
JACOBIAN_BACKENDS = [CurvlinopsGGN, CurvlinopsEF, BackPackGGN, AsdlGGN]


@pytest.mark.parametrize("subnet", [False, True])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("backend", JACOBIAN_BACKENDS)
def test_functorch_jacobians_layout(backend, name, subnet):
    model = make_model(name, 3)
    x, y = make_data(name, "classification", 3)
    truth = DenseCurvature(model, x, y, "classification")
    J = truth.J  # (batch, outputs, P)
    indices = torch.tensor([0, 5, 11, 17, 20]) if subnet else None
    curv = backend(model, "classification", subnetwork_indices=indices)
    Js, f = curv.functorch_jacobians(x)
    expected = J if indices is None else J[..., indices]
    assert Js.shape == (len(x), expected.shape[-1], 3)
    torch.testing.assert_close(Js, expected.transpose(1, 2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, truth.f, rtol=1e-12, atol=1e-12)
    assert not Js.requires_grad


@pytest.mark.parametrize("backend", JACOBIAN_BACKENDS)
def test_selected_output_jacobians(backend):
    model = make_model("mlp", 4)
    x, y = make_data("mlp", "classification", 4)
    truth = DenseCurvature(model, x, y, "classification")
    curv = backend(model, "classification")
    picked = torch.tensor([3, 0, 2, 2, 1])
    Js, f = curv.selected_output_jacobians(x, picked)
    rows = torch.arange(len(x))
    assert Js.shape == (5, 1, truth.J.shape[-1])
    torch.testing.assert_close(Js[:, 0], truth.J[rows, picked], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f, truth.f, rtol=1e-12, atol=1e-12)
    several = torch.tensor([[0, 3], [1, 1], [2, 0], [3, 2], [1, 0]])
    Js, _ = curv.selected_output_jacobians(x, several)
    expected = truth.J[rows[:, None], several]
    torch.testing.assert_close(Js, expected, rtol=1e-10, atol=1e-12)
    # differentiable w.r.t. the inputs only with enable_backprop
    xg = x.clone().requires_grad_(True)
    assert not curv.selected_output_jacobians(xg, picked)[0].requires_grad
    Jg, _ = curv.selected_output_jacobians(xg, picked, enable_backprop=True)
    assert Jg.requires_grad
    for bad in [torch.tensor([0, 1]), torch.zeros(5, 1, 1, dtype=torch.long)]:
        with pytest.raises(ValueError, match=r"outputs must have shape \(5,\)"):
            curv.selected_output_jacobians(x, bad)
    with pytest.raises(ValueError, match="integer tensor"):
        curv.selected_output_jacobians(x, picked.double())
    with pytest.raises(ValueError, match="outside the model's outputs"):
        curv.selected_output_jacobians(x, torch.tensor([0, 1, 9, 0, 0]))


@pytest.mark.parametrize("backend", [AsdlGGN, AsdlEF, AsdlHessian])
def test_asdl_loss_type(backend):
    model = make_model("mlp", 2)
    assert backend(model, "regression").loss_type == "mse"
    assert backend(model, "classification").loss_type == "cross_entropy"
    assert backend(model, "reward_modeling").loss_type == "cross_entropy"


# ---- symeig ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_symeig_reads_the_upper_triangle(dtype):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    S = A @ A.mT + torch.eye(5)
    garbage = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64).tril(-1)
    M = (S.triu() + 10 * garbage).to(dtype)  # lower triangle is not S's
    evals, evecs = symeig(M)
    assert evals.dtype == dtype and evecs.dtype == dtype
    true_evals, _ = torch.linalg.eigh(S.to(dtype).double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(evals.double(), true_evals, rtol=tol, atol=tol)
    upper = S.to(dtype).double()
    rebuilt = evecs.double() @ torch.diag_embed(evals.double()) @ evecs.double().mT
    torch.testing.assert_close(rebuilt, upper, rtol=tol, atol=tol * 20)
