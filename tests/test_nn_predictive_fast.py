"""The Monte Carlo (``pred_type="nn"``) predictive against an explicit loop: weight
samples from ``la.sample`` loaded into a deep copy of the network with
``vector_to_parameters``, one forward pass each. Also the building blocks of
``laplace.parametric.sampling`` against plain torch."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import vector_to_parameters
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.parametric.sampling import (
    affine_samples,
    mean_and_variance,
    outputs_under_weights,
    sample_chunk_rows,
    softmax_mean,
)

CLASSES, OUTPUTS = 3, 2


def net(dtype, n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, n_out)
    ).to(dtype)


def fitted(likelihood, structure, subset, dtype, **kwargs):
    n_out = CLASSES if likelihood == "classification" else OUTPUTS
    model = net(dtype, n_out)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20, 2, generator=gen, dtype=dtype)
    if likelihood == "classification":
        y = torch.randint(n_out, (20,), generator=gen)
    else:
        y = torch.randn(20, n_out, generator=gen, dtype=dtype)
    la = Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.5,
        **kwargs,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    return la, model


def reference_outputs(la, model, X, thetas):
    """``(n_samples, batch, n_outputs)`` of a copy of ``model`` per weight sample."""
    outs = []
    for theta in thetas:
        clone = copy.deepcopy(model)
        if la.n_params == sum(p.numel() for p in model.parameters()):
            target = clone
        else:  # last layer
            target = dict(clone.named_modules())[la.model.last_layer_name]
        vector_to_parameters(theta.to(X.dtype), target.parameters())
        with torch.no_grad():
            outs.append(clone(X))
    return torch.stack(outs)


STRUCTURES = ["full", "kron", "diag"]
SUBSETS = ["all", "last_layer"]
LIKELIHOODS = ["classification", "regression"]
DTYPES = [torch.float64, torch.float32]


def tolerance(dtype):
    # float32: the batched last-layer product and chunked sampling sum in
    # another order than the loop, so a few ulps of the outputs
    return (
        {"rtol": 1e-10, "atol": 1e-12}
        if dtype == torch.float64
        else {
            "rtol": 1e-5,
            "atol": 1e-6,
        }
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("chunk_elements", [2**20, 48])
def test_nn_predictive_equals_explicit_loop(
    structure, subset, likelihood, dtype, chunk_elements
):
    la, model = fitted(likelihood, structure, subset, dtype)
    # a small budget forces several chunks of samples
    la.sample_chunk_elements = chunk_elements
    X = torch.randn(7, 2, dtype=dtype)
    n = 37
    thetas = la.sample(n, generator=torch.Generator().manual_seed(3))
    ref = reference_outputs(la, model, X, thetas)
    tol = tolerance(dtype)
    out = la(
        X,
        pred_type="nn",
        link_approx="mc",
        n_samples=n,
        generator=torch.Generator().manual_seed(3),
    )
    if likelihood == "classification":
        torch.testing.assert_close(out, torch.softmax(ref, -1).mean(0), **tol)
        assert out.is_contiguous()
    else:
        torch.testing.assert_close(out[0], ref.mean(0), **tol)
        torch.testing.assert_close(out[1], ref.var(0), **tol)
        assert out[0].shape == out[1].shape == (7, OUTPUTS)
    fs = la.functional_samples(
        X, pred_type="nn", n_samples=n, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(fs, ref, **tol)
    ps = la.predictive_samples(
        X, pred_type="nn", n_samples=n, generator=torch.Generator().manual_seed(3)
    )
    expected = torch.softmax(ref, -1) if likelihood == "classification" else ref
    torch.testing.assert_close(ps, expected, **tol)
    # the user's model is left as it was
    for p, q in zip(model.parameters(), net(dtype, ref.shape[-1]).parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("one_draw", [False, True])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_do_not_depend_on_chunking(structure, subset, one_draw, monkeypatch):
    la, _ = fitted("classification", structure, subset, torch.float64)
    if one_draw:  # the route of devices whose noise is drawn at once
        monkeypatch.setattr(type(la), "_draws_noise_in_chunks", lambda self: False)
    torch.manual_seed(7)
    eps = torch.randn(21, la.n_params)
    expected = la.mean + la._precision().sample_deviations(eps)
    after_expected = torch.randn(3)
    la.sample_chunk_elements = 3 * la.n_params
    torch.manual_seed(7)
    chunks = list(la._weight_sample_chunks(21, None))
    after_chunks = torch.randn(3)
    assert len(chunks) > 1
    torch.testing.assert_close(torch.cat(chunks), expected, rtol=1e-12, atol=1e-14)
    # the global random state moved on by the same amount
    assert torch.equal(after_expected, after_chunks)
    torch.manual_seed(7)
    torch.testing.assert_close(la.sample(21), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_params", [1, 3, 8, 17, 2851])
@pytest.mark.parametrize("n_samples", [1, 5, 16, 17, 100])
@pytest.mark.parametrize("max_rows", [1, 7, 32])
def test_chunked_noise_is_one_draw(dtype, n_params, n_samples, max_rows):
    sizes = sample_chunk_rows(n_samples, n_params, max_rows)
    assert sum(sizes) == n_samples and min(sizes) >= 1
    gen = torch.Generator().manual_seed(11)
    whole = torch.randn(n_samples, n_params, generator=gen, dtype=dtype)
    whole_next = torch.randn(2, generator=gen, dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    parts = [torch.randn(s, n_params, generator=gen, dtype=dtype) for s in sizes]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.randn(2, generator=gen, dtype=dtype), whole_next)


def test_chunk_rows_respect_the_budget():
    assert sample_chunk_rows(100, 16, 10) == [10] * 10
    assert sample_chunk_rows(100, 2, 10) == [8] * 11 + [12]
    assert sample_chunk_rows(100, 4, 10) == [8] * 12 + [4]
    # a remainder of fewer than 16 numbers joins the previous chunk
    assert sample_chunk_rows(17, 1, 16) == [17]


@pytest.mark.parametrize("subset", SUBSETS)
def test_gradients_through_the_nn_predictive(subset):
    la, model = fitted(
        "classification", "kron", subset, torch.float64, enable_backprop=True
    )
    X = torch.randn(5, 2, requires_grad=True)
    out = la(
        X,
        pred_type="nn",
        link_approx="mc",
        n_samples=6,
        generator=torch.Generator().manual_seed(2),
    )
    (grad,) = torch.autograd.grad((out * torch.arange(3.0)).sum(), X)
    thetas = la.sample(6, generator=torch.Generator().manual_seed(2))
    Xr = X.detach().clone().requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    if subset == "last_layer":
        names = names[-2:]
    probs = 0
    for theta in thetas:
        chunks = theta.split([dict(model.named_parameters())[n].numel() for n in names])
        params = {
            n: c.view_as(dict(model.named_parameters())[n])
            for n, c in zip(names, chunks)
        }
        probs = probs + torch.softmax(functional_call(model, params, (Xr,)), -1) / 6
    (ref,) = torch.autograd.grad((probs * torch.arange(3.0)).sum(), Xr)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.lin(x)


def test_parameters_are_restored_when_the_forward_raises():
    model = Failing()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    values = [torch.randn(5, *p.shape) for p in params]
    with pytest.raises(RuntimeError, match="boom"):
        outputs_under_weights(model, params, values, lambda: model(torch.ones(1, 2)))
    assert [p for p in model.parameters()] == params
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    for p, b in zip(params, before):
        assert torch.equal(p, b)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3, bias=False)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_parameters_get_the_same_sample():
    model = Tied()
    params = list(model.parameters())  # tied weight listed once
    assert len(params) == 2
    values = [torch.randn(4, *p.shape) for p in params]
    x = torch.randn(5, 3)
    out = outputs_under_weights(model, params, values, lambda: model(x))
    for i in range(4):
        ref = functional_call(
            model, {"a.weight": values[0][i], "b.bias": values[1][i]}, (x,)
        )
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=0)


def test_parameters_outside_the_module_are_rejected():
    with pytest.raises(ValueError, match="not part of the module"):
        outputs_under_weights(nn.Linear(2, 2), [nn.Parameter(torch.ones(1))], [], None)


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("sampled", ["both", "weight", "bias", "no_bias"])
def test_affine_samples(lead, sampled):
    n, O, D = 4, 3, 5
    phi = torch.randn(*lead, D)
    W, b = torch.randn(n, O, D), torch.randn(n, O)
    weight = W if sampled != "bias" else W[0]
    bias = {"both": b, "weight": b[0], "bias": b, "no_bias": None}[sampled]
    ref = torch.stack(
        [
            nn.functional.linear(phi, weight if weight.ndim == 2 else weight[s], None)
            + (0 if bias is None else (bias if bias.ndim == 1 else bias[s]))
            for s in range(n)
        ]
    )
    out = affine_samples(phi, weight, bias)
    assert out.shape == (n, *lead, O)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [[1], [5], [3, 1, 4], [2, 2, 2, 9]])
@pytest.mark.parametrize("layout", ["natural", "classes_first"])
def test_monte_carlo_averages(sizes, layout):
    samples = torch.randn(sum(sizes), 6, 4) * 3 + 1
    if layout == "classes_first":
        samples = samples.transpose(1, 2).contiguous().transpose(1, 2)
    chunks = samples.split(sizes)
    torch.testing.assert_close(
        softmax_mean(chunks), torch.softmax(samples, -1).mean(0), rtol=1e-12, atol=0
    )
    mean, var = mean_and_variance(chunks)
    torch.testing.assert_close(mean, samples.mean(0), rtol=1e-12, atol=1e-14)
    if sum(sizes) > 1:
        torch.testing.assert_close(var, samples.var(0), rtol=1e-12, atol=1e-14)
    else:
        assert var.isnan().all()


class MyLinear(nn.Linear):
    """A subclass: the last-layer route falls back to one forward per sample."""


@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_last_layer_variants(frozen):
    model = net(torch.float64, CLASSES)
    if frozen is None:
        old = model[4]
        model[4] = MyLinear(4, CLASSES)
        model[4].load_state_dict(old.state_dict())
    else:
        getattr(model[4], frozen).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20, 2, generator=gen)
    y = torch.randint(CLASSES, (20,), generator=gen)
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="diag",
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    thetas = la.sample(9, generator=torch.Generator().manual_seed(4))
    refs = []
    for theta in thetas:
        clone = copy.deepcopy(model)
        trained = [p for p in clone[4].parameters() if p.requires_grad]
        vector_to_parameters(theta, trained)
        with torch.no_grad():
            refs.append(clone(X[:6]))
    out = la.functional_samples(
        X[:6], pred_type="nn", n_samples=9, generator=torch.Generator().manual_seed(4)
    )
    torch.testing.assert_close(out, torch.stack(refs), rtol=1e-10, atol=1e-12)
