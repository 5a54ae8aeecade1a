"""Jacobian-free GLM predictives against dense ground truth in float64.

Ground truth: Jacobians from ``torch.func.jacrev`` on the whole batch and the dense
posterior covariance (inverse of the dense precision), ``J Sigma J^T``. Each fast
route must also equal the library's Jacobian route to ``rtol=1e-10``, and must
not call the backend's Jacobians at all (checked by making them raise).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

RTOL_DENSE = 1e-8  # the ground truth inverts a dense precision
RTOL_ROUTE = 1e-10  # same quantities, other order of operations


def mlp(n_out, frozen=False, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5),
        nn.Tanh(),
        nn.Linear(5, 4),
        nn.Tanh(),
        nn.Linear(4, n_out, bias=bias),
    ).double()
    if frozen:
        model[0].requires_grad_(False)
        model[4].bias.requires_grad_(False)
    return model


def cnn(n_out):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, n_out),
    ).double()


def seq(n_out):
    """A linear layer applied at 3 positions per sample (weight sharing)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, n_out)
    ).double()


INPUTS = {"mlp": (3,), "cnn": (2, 8, 8), "seq": (3, 4), "frozen": (3,)}
MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "seq": seq,
    "frozen": lambda n_out: mlp(n_out, frozen=True),
}


def data(likelihood, n_out, shape, n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        return X, torch.randint(n_out, (n,), generator=gen)
    return X, torch.randn(n, n_out, generator=gen, dtype=torch.float64)


def dense_jacobians(model, X, prefix=""):
    named = {
        n: p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(prefix)
    }
    jac = jacrev(lambda ps: functional_call(model, ps, (X,)))(named)
    n_out = model(X).shape[-1]
    return torch.cat([j.reshape(len(X), n_out, -1) for j in jac.values()], -1)


def dense_covariance(la):
    P = la.posterior_precision
    if isinstance(P, torch.Tensor):
        return torch.diag(1 / P) if P.ndim == 1 else torch.linalg.inv(P)
    return torch.linalg.inv(P.to_matrix())


def forbid(la, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"the fast route called backend.{name}")

    setattr(la.backend, name, fail)


def check_against_truth(la, X_test, J, jac_name):
    Sigma = dense_covariance(la)
    truth = J @ Sigma @ J.mT
    Js, f_ref = la._jacobians_and_output(X_test)
    route = la.functional_variance(Js)
    forbid(la, jac_name)
    f_mu, f_var = la._glm_predictive_distribution(X_test)
    _, f_diag = la._glm_predictive_distribution(X_test, diagonal_output=True)
    torch.testing.assert_close(f_mu, f_ref, rtol=RTOL_ROUTE, atol=0)
    torch.testing.assert_close(f_var, route, rtol=RTOL_ROUTE, atol=1e-14)
    torch.testing.assert_close(f_var, truth, rtol=RTOL_DENSE, atol=1e-12)
    torch.testing.assert_close(
        f_diag, truth.diagonal(dim1=1, dim2=2), rtol=RTOL_DENSE, atol=1e-12
    )
    return f_var


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
def test_all_weights_per_layer_route(arch, structure, likelihood, n_out):
    model = MODELS[arch](n_out)
    X, y = data(likelihood, n_out, INPUTS[arch])
    la = Laplace(model, likelihood, "all", structure, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data(likelihood, n_out, INPUTS[arch], n=7, seed=5)
    check_against_truth(la, X_test, dense_jacobians(model, X_test), "jacobians")


@pytest.mark.parametrize("damping", [False, True])
def test_kron_layerwise_prior_and_damping(damping):
    model = cnn(3)
    X, y = data("classification", 3, INPUTS["cnn"])
    la = Laplace(
        model,
        "classification",
        "all",
        "kron",
        damping=damping,
        prior_precision=torch.tensor([0.5, 1.0, 2.0, 0.3, 4.0]),
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data("classification", 3, INPUTS["cnn"], n=5, seed=5)
    check_against_truth(la, X_test, dense_jacobians(model, X_test), "jacobians")


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
@pytest.mark.parametrize("variant", ["bias", "no_bias", "frozen_bias"])
def test_last_layer_closed_forms(structure, likelihood, n_out, variant):
    model = mlp(n_out, bias=variant != "no_bias")
    if variant == "frozen_bias":
        model[4].bias.requires_grad_(False)
    X, y = data(likelihood, n_out, (3,))
    la = Laplace(model, likelihood, "last_layer", structure, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data(likelihood, n_out, (3,), n=7, seed=5)
    J = dense_jacobians(model, X_test, prefix="4.")
    f_var = check_against_truth(la, X_test, J, "last_layer_jacobians")
    # laplace-torch's return value: (f_mu, diagonal of f_var)
    f_mu_fast, f_var_fast = la.functional_variance_fast(X_test)
    torch.testing.assert_close(f_mu_fast, model(X_test), rtol=0, atol=0)
    torch.testing.assert_close(
        f_var_fast, f_var.diagonal(dim1=1, dim2=2), rtol=RTOL_ROUTE, atol=1e-14
    )
    if likelihood == "regression":
        mean, var = la(X_test)
        torch.testing.assert_close(var, f_var, rtol=RTOL_ROUTE, atol=0)
        torch.testing.assert_close(mean, model(X_test), rtol=RTOL_ROUTE, atol=0)


@pytest.mark.parametrize(
    "key", [("all", "full"), ("all", "kron"), ("all", "diag"), ("last_layer", "full")]
)
def test_chunked_rows_and_outputs_give_the_same_result(key):
    model = cnn(3)
    X, y = data("classification", 3, INPUTS["cnn"])
    la = Laplace(model, "classification", *key, prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data("classification", 3, INPUTS["cnn"], n=9, seed=5)
    whole = la._glm_predictive_distribution(X_test)
    whole_diag = la._glm_predictive_distribution(X_test, diagonal_output=True)
    la.glm_chunk_elements = 40  # forces one row (and one output) per chunk
    for diagonal, ref in ((False, whole), (True, whole_diag)):
        chunked = la._glm_predictive_distribution(X_test, diagonal_output=diagonal)
        torch.testing.assert_close(chunked[0], ref[0], rtol=RTOL_ROUTE, atol=0)
        torch.testing.assert_close(chunked[1], ref[1], rtol=RTOL_ROUTE, atol=1e-14)


class Shared(nn.Module):
    """One linear layer called twice: per-layer factors would be wrong."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


@pytest.mark.parametrize(
    "make",
    [
        lambda: Shared().double(),
        lambda: nn.Sequential(
            nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)
        ).double(),
    ],
    ids=["shared_layer", "layernorm"],
)
def test_unsupported_networks_fall_back_to_jacobians(make):
    torch.manual_seed(0)
    model = make()
    X, y = data("regression", 2, (3,))
    la = Laplace(model, "regression", "all", "diag", prior_precision=0.7)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data("regression", 2, (3,), n=6, seed=5)
    J = dense_jacobians(model, X_test)
    truth = J @ dense_covariance(la) @ J.mT
    _, f_var = la(X_test)
    torch.testing.assert_close(f_var, truth, rtol=RTOL_DENSE, atol=1e-12)


@pytest.mark.parametrize(
    "key", [("all", "kron"), ("all", "diag"), ("last_layer", "kron")]
)
def test_input_gradients_match_the_jacobian_route(key):
    model = mlp(2)
    X, y = data("regression", 2, (3,))
    la = Laplace(model, "regression", *key, prior_precision=0.7, enable_backprop=True)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    X_test, _ = data("regression", 2, (3,), n=5, seed=5)
    x_fast = X_test.clone().requires_grad_(True)
    mean, var = la(x_fast)
    (mean.sum() + var.sum()).backward()
    x_ref = X_test.clone().requires_grad_(True)
    Js, f = la._jacobians_and_output(x_ref)
    (f.sum() + la.functional_variance(Js).sum()).backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=RTOL_ROUTE, atol=1e-14)


@pytest.mark.layer_factor_fit
@pytest.mark.parametrize(
    "arch,subset",
    [("cnn", "all"), ("seq", "all"), ("frozen", "all"), ("mlp", "last_layer")],
)
@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
def test_layerwise_ggn_fit_matches_dense(arch, subset, structure, likelihood, n_out):
    """The default backend's exact GGN, computed from layer factors without
    calling the backend, equals the dense J^T Lambda J."""
    model = MODELS[arch](n_out)
    X, y = data(likelihood, n_out, INPUTS[arch])
    kw = {"last_layer_name": "4"} if subset == "last_layer" else {}
    la = Laplace(model, likelihood, subset, structure, **kw)
    forbid(la, structure)
    la.glm_chunk_elements = 300  # several row chunks per batch
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    J = dense_jacobians(model, X, prefix="4." if subset == "last_layer" else "")
    f = model(X).detach()
    if likelihood == "classification":
        p = torch.softmax(f, -1)
        Lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        loss = nn.functional.cross_entropy(f, y, reduction="sum")
    else:
        Lam = torch.eye(n_out).expand(len(X), -1, -1)
        loss = 0.5 * (f - y).square().sum()
    ggn = torch.einsum("bop,boq,bqr->pr", J, Lam, J)
    expected = ggn if structure == "full" else ggn.diagonal()
    torch.testing.assert_close(la.H, expected, rtol=RTOL_DENSE, atol=1e-12)
    torch.testing.assert_close(la.loss, loss, rtol=RTOL_DENSE, atol=0)


@pytest.mark.layer_factor_fit
@pytest.mark.parametrize(
    "arch,subset",
    [("cnn", "all"), ("seq", "all"), ("frozen", "all"), ("mlp", "last_layer")],
)
@pytest.mark.parametrize("likelihood,n_out", [("classification", 3), ("regression", 2)])
def test_layerwise_kfac_fit_matches_the_backend(arch, subset, likelihood, n_out):
    """KFAC from layer factors equals the default backend's (curvlinops) KFAC of
    the whole data set; the fit itself must not call the backend."""
    model = MODELS[arch](n_out)
    X, y = data(likelihood, n_out, INPUTS[arch])
    kw = {"last_layer_name": "4"} if subset == "last_layer" else {}
    la = Laplace(model, likelihood, subset, "kron", **kw)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
    backend = la.backend
    inputs = la.model.forward_with_features(X)[1] if subset == "last_layer" else X
    loss, expected = backend.kron(inputs, y, N=len(X))
    torch.testing.assert_close(la.loss, loss, rtol=RTOL_DENSE, atol=0)
    for got, want in zip(la.H_facs.kfacs, expected.kfacs):
        for F, E in zip(got, want):
            torch.testing.assert_close(F, E, rtol=RTOL_DENSE, atol=1e-12)
    forbid(la, "kron")
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10))
