"""The predictive mean is the network's output: ``la(x)`` and ``la(x,
joint=True)`` give the same means, equal to ``model(x)`` for float32 inputs, for
every class, after ``load_state_dict`` too, and however the variances are
chunked. (The contract is ``torch.allclose`` with default tolerances; ours is
one forward pass over the batch, so the numbers are even equal.)

The model cannot be vectorised with ``torch.func.vmap`` (data-dependent control
flow), so Jacobian routes evaluate it sample by sample, which rounds
differently from one pass over the batch; with outputs near zero the default
``atol`` of ``allclose`` then fails. The same holds for passes over chunks of
rows."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, FunctionalLaplace, FunctionalLLLaplace, Laplace, VaLLA


class Branchy(nn.Module):
    """MLP 3 -> 16 -> 16 -> ``n_out`` with a data-dependent branch."""

    def __init__(self, n_out: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if bool(h.abs().max() > 2):  # never true; vmap cannot trace it
            h = h / 2
        return self.head(h)


def wide_model(n_out: int) -> nn.Module:
    return Branchy(n_out).float()


def data(n_out: int):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=gen)
    y = torch.randn(24, n_out, generator=gen)
    X_test = torch.randn(16, 3, generator=gen)
    return DataLoader(TensorDataset(X, y), batch_size=20), X_test


SUBNET = torch.arange(0, 300, 7)

PARAMETRIC = [
    ("all", "full", {}),
    ("all", "kron", {}),
    ("all", "diag", {}),
    ("last_layer", "full", {}),
    ("last_layer", "kron", {}),
    ("last_layer", "diag", {}),
    ("subnetwork", "full", {"subnetwork_indices": SUBNET}),
    ("subnetwork", "diag", {"subnetwork_indices": SUBNET}),
]


def build(kind, spec, model):
    if kind == "parametric":
        subset, structure, kwargs = spec
        return Laplace(model, "regression", subset, structure, **kwargs)
    if kind == "sod":
        return FunctionalLaplace(model, "regression", n_subset=10)
    if kind == "sod_ll":
        return FunctionalLLLaplace(model, "regression", n_subset=10)
    if kind == "ella":
        return ELLA(model, "regression", subsample_size=10, n_eigenvalues=5)
    return VaLLA(model, "regression", "random", num_inducing=4)


CASES = [("parametric", spec) for spec in PARAMETRIC] + [
    ("sod", None),
    ("sod_ll", None),
    ("ella", None),
    ("valla", None),
]


def fit(la, loader):
    if isinstance(la, VaLLA):
        la.fit(loader, iterations=2)
    else:
        la.fit(loader)


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed")
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize(
    "kind,spec", CASES, ids=[k if s is None else "-".join(s[:2]) for k, s in CASES]
)
def test_mean_is_network_output(kind, spec, n_out):
    torch.set_default_dtype(torch.float32)
    model = wide_model(n_out)
    loader, X_test = data(n_out)
    with torch.no_grad():
        expected = model(X_test)
    la = build(kind, spec, model)
    fit(la, loader)
    fresh = build(kind, spec, model)
    fresh.load_state_dict(la.state_dict())
    pred_type = "glm" if kind == "parametric" else "gp"
    for obj in (la, fresh):
        f_mu, f_var = obj(X_test, pred_type=pred_type)
        assert f_mu.shape == (16, n_out) and f_var.shape == (16, n_out, n_out)
        assert torch.allclose(f_mu, expected) and torch.equal(f_mu, expected)
        f_mu_joint, _ = obj(X_test, pred_type=pred_type, joint=True)
        assert torch.allclose(f_mu.flatten(), f_mu_joint)
        assert torch.equal(f_mu.flatten(), f_mu_joint)
        f_mu_diag, _ = obj(X_test, pred_type=pred_type, diagonal_output=True)
        assert torch.equal(f_mu_diag, expected)


@pytest.mark.filterwarnings("ignore:torch.func.vmap failed")
@pytest.mark.parametrize(
    "subset,structure",
    # the subnetwork takes the generic Jacobian route (as LowRankLaplace)
    [("all", "full"), ("all", "diag"), ("subnetwork", "full")],
)
def test_mean_is_network_output_when_rows_are_chunked(subset, structure):
    """Variances computed a few rows at a time; the mean is still one pass."""
    torch.set_default_dtype(torch.float32)
    model = wide_model(2)
    loader, X_test = data(2)
    kwargs = {"subnetwork": {"subnetwork_indices": SUBNET}}.get(subset, {})
    la = Laplace(model, "regression", subset, structure, **kwargs)
    la.fit(loader)
    la.glm_chunk_elements = 2 * la.n_params * 7  # 7 rows of Jacobians at a time
    with torch.no_grad():
        expected = model(X_test)
    f_mu, f_var = la(X_test)
    assert torch.allclose(f_mu, expected) and torch.equal(f_mu, expected)
    la.glm_chunk_elements = 2**30
    torch.testing.assert_close(f_var, la(X_test)[1], rtol=1e-4, atol=1e-6)
