"""Registered parameters the forward pass never uses (a submodule never called)
get zero curvature from the data, so only the prior acts on them, for every
structure. Ground truth: the dense torch.func curvature, whose rows and columns of
unused parameters are zero."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace, FunctionalLaplace, KronLaplace, Laplace
from laplace.curvature import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    EFInterface,
    GGNInterface,
)
from tests.ground_truth import DenseCurvature
from tests.model_zoo import ALL_KEYS, KEY_IDS, fit_laplace, make_laplace

N = 12
RTOL = dict(rtol=1e-9, atol=1e-11)


class WithUnused(nn.Module):
    """3 -> 4 (tanh) -> n_out; ``spare`` (registered between them) never runs."""

    def __init__(self, n_out=2):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 4)
        self.spare = nn.Linear(3, 3)
        self.out = nn.Linear(4, n_out)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


# positions of spare's 12 entries among the 38 parameters (inp: 16, spare, out)
SPARE = slice(16, 28)


def data(likelihood, n_out=2):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N, 3, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(n_out, (N,), generator=gen)
    else:
        y = torch.randn(N, n_out, generator=gen, dtype=torch.float64)
    return X, y


def loader(likelihood, batch_size=5):
    return DataLoader(TensorDataset(*data(likelihood)), batch_size=batch_size)


def truth(likelihood, kind="ggn"):
    X, y = data(likelihood)
    return getattr(DenseCurvature(WithUnused(), X, y, likelihood), kind)


FULL_BACKENDS = [
    (CurvlinopsGGN, "ggn"),
    (CurvlinopsEF, "ef"),
    (CurvlinopsHessian, "hess"),
    (GGNInterface, "ggn"),
    (EFInterface, "ef"),
]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend,kind", FULL_BACKENDS, ids=lambda v: str(v))
def test_full_curvature_has_zero_rows_for_unused_parameters(backend, kind, likelihood):
    la = FullLaplace(WithUnused(), likelihood, backend=backend)
    la.fit(loader(likelihood))
    expected = truth(likelihood, kind)
    assert (expected[SPARE] == 0).all()
    torch.testing.assert_close(la.H, expected, **RTOL)
    if kind == "hess":  # indefinite away from a minimum
        return
    # only the prior acts on them: their posterior is the prior, independent of
    # the rest
    cov = la.posterior_covariance
    torch.testing.assert_close(cov[SPARE, SPARE], torch.eye(12), **RTOL)
    assert (cov[SPARE, :16] == 0).all() and (cov[SPARE, 28:] == 0).all()


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("backend,kind", FULL_BACKENDS[:2], ids=str)
def test_diag_curvature(backend, kind, likelihood):
    la = Laplace(WithUnused(), likelihood, "all", "diag", backend=backend)
    la.fit(loader(likelihood))
    torch.testing.assert_close(la.H, truth(likelihood, kind).diagonal(), **RTOL)


class WithoutSpare(nn.Module):
    """``WithUnused`` without the unused layer, same values."""

    def __init__(self):
        super().__init__()
        ref = WithUnused()
        self.inp, self.out = ref.inp, ref.out

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize(
    "backend_kwargs",
    [{}, {"kfac_approx": "reduce"}],  # the layer-factor route and curvlinops'
)
@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF])
def test_kron_factors_of_unused_layers_are_zero(backend, backend_kwargs, likelihood):
    """The used layers' factors equal those of the model without the unused
    layer (itself checked against dense ground truth elsewhere)."""
    kwargs = dict(backend=backend, backend_kwargs=backend_kwargs)
    la = KronLaplace(WithUnused(), likelihood, **kwargs)
    la.fit(loader(likelihood))
    ref = KronLaplace(WithoutSpare(), likelihood, **kwargs)
    ref.fit(loader(likelihood))
    blocks = la.H_facs.kfacs
    spare = blocks[2:4]  # spare.weight [G, A], spare.bias [G]
    assert [tuple(f.shape) for b in spare for f in b] == [(3, 3), (3, 3), (3, 3)]
    assert all((f == 0).all() for b in spare for f in b)
    for got, want in zip(blocks[:2] + blocks[4:], ref.H_facs.kfacs):
        for F_got, F_want in zip(got, want):
            torch.testing.assert_close(F_got, F_want, **RTOL)
    # the spare log-determinants cancel; the prior's scatter remains
    spare_norm = sum(p.square().sum() for p in WithUnused().spare.parameters())
    torch.testing.assert_close(
        la.log_marginal_likelihood(),
        ref.log_marginal_likelihood() - 0.5 * spare_norm,
        **RTOL,
    )


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_low_rank_eigenvectors_avoid_unused_parameters(likelihood):
    """With a rank of at least the GGN's rank, ``U diag(lambda) U^T`` is the
    GGN."""
    la = Laplace(
        WithUnused(),
        likelihood,
        "all",
        "lowrank",
        backend_kwargs={"low_rank": 24},
    )
    la.fit(loader(likelihood))
    U, evals = la.H
    torch.testing.assert_close((U * evals) @ U.T, truth(likelihood), **RTOL)
    # eigenvectors of non-zero eigenvalues are zero there (eigenvalues near the
    # round-off level of the GGN have eigenvectors only accurate to eps / gap)
    assert U[SPARE][:, evals > 1e-6 * evals.max()].abs().max() < 1e-12


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_subnetwork_including_unused_parameters(structure):
    idx = torch.tensor([0, 5, 17, 20, 27, 30, 37])  # 17, 20, 27: spare
    la = Laplace(
        WithUnused(), "classification", "subnetwork", structure, subnetwork_indices=idx
    )
    la.fit(loader("classification"))
    expected = truth("classification")[idx][:, idx]
    expected = expected if structure == "full" else expected.diagonal()
    torch.testing.assert_close(la.H, expected, **RTOL)


def test_function_space_equals_weight_space():
    """The GP view on all points has the weight-space evidence (the unused
    parameters' prior terms cancel in both)."""
    full = FullLaplace(WithUnused(), "regression")
    full.fit(loader("regression"))
    gp = FunctionalLaplace(WithUnused(), "regression", n_subset=N)
    gp.fit(loader("regression"))
    torch.testing.assert_close(
        gp.log_marginal_likelihood(), full.log_marginal_likelihood(), **RTOL
    )


@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_every_class_fits_and_predicts(key):
    model = WithUnused()
    la = make_laplace(model, "classification", key)
    fit_laplace(la, loader("classification"))
    probs = la(torch.randn(4, 3, dtype=torch.float64))
    assert probs.shape == (4, 2) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
