"""Posterior structures (laplace.structures) against dense ground truth: for
random curvatures in float64, every precision object's logdet, square forms,
quadratic form, sample root, covariance, layer blocks and spectrum equal the
same quantities of the dense matrix ``P = c H + prior`` computed with
torch.linalg; the saved curvature round-trips through ``loaded``."""

import pytest
import torch

from laplace.structures import (
    DenseStructure,
    DiagonalStructure,
    KroneckerStructure,
    Layout,
    LowRankStructure,
)
from laplace.utils.matrix import Kron
from laplace.utils.memo import Memo

TOL = dict(rtol=1e-10, atol=1e-12)
# one weight (3, 2) and one bias (3,): 9 parameters in two groups
PARAMS = (torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
LAYOUT = Layout(PARAMS, 9, (6, 3))
C = torch.tensor(0.7, dtype=torch.float64)
PRIORS = {
    "scalar": torch.tensor([1.3], dtype=torch.float64),
    "per_layer": torch.tensor([0.5, 2.0], dtype=torch.float64),
    "per_parameter": torch.linspace(0.3, 3.0, 9, dtype=torch.float64),
}


def _psd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
    return A @ A.T / n


def _prior_diag(prior):
    if prior.numel() == 1:
        return prior.expand(9)
    if prior.numel() == 2:
        return torch.repeat_interleave(prior, torch.tensor([6, 3]))
    return prior


def _case(kind, prior, damping=False):
    """Structure, curvature and the dense posterior precision."""
    p = _prior_diag(prior)
    if kind == "full":
        H = _psd(9, 0)
        return DenseStructure({}), H, C * H + torch.diag(p)
    if kind == "diag":
        H = _psd(9, 0).diagonal().clone()
        return DiagonalStructure({}), H, torch.diag(C * H + p)
    if kind == "kron":
        G, A, B = _psd(3, 1), _psd(2, 2), _psd(3, 3)
        H = Kron([[G, A], [B]])
        deltas = prior.expand(2)
        if damping:
            root_c, root_d = C.sqrt(), deltas[0].sqrt()
            eye = torch.eye
            weight = torch.kron(
                root_c * G + root_d * eye(3, dtype=G.dtype),
                root_c * A + root_d * eye(2, dtype=G.dtype),
            )
        else:
            weight = C * torch.kron(G, A) + deltas[0] * torch.eye(6, dtype=G.dtype)
        bias = C * B + deltas[1] * torch.eye(3, dtype=G.dtype)
        return (
            KroneckerStructure({"damping": damping}),
            H,
            torch.block_diag(weight, bias),
        )
    gen = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(9, 3, generator=gen, dtype=torch.float64))
    lam = torch.tensor([3.0, 1.5, 0.2], dtype=torch.float64)
    structure = LowRankStructure({"backend": None, "backend_kwargs": {"low_rank": 3}})
    return structure, (U, lam), C * U @ torch.diag(lam) @ U.T + torch.diag(p)


CASES = [
    (kind, prior)
    for kind in ("full", "diag", "kron", "lowrank")
    for prior in PRIORS
    if not (kind == "kron" and prior == "per_parameter")
]


@pytest.mark.parametrize("kind,prior", CASES)
def test_precision_matches_dense_matrix(kind, prior):
    structure, H, P = _case(kind, PRIORS[prior])
    precision = structure.precision(H, C, PRIORS[prior], LAYOUT, Memo())
    Sigma = torch.linalg.inv(P)
    torch.testing.assert_close(precision.logdet(), torch.logdet(P), **TOL)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(4, 2, 9, generator=gen, dtype=torch.float64)
    expected = W @ Sigma @ W.mT
    torch.testing.assert_close(precision.square_form(W), expected, **TOL)
    torch.testing.assert_close(
        precision.square_form_diagonal(W), expected.diagonal(dim1=1, dim2=2), **TOL
    )
    delta = torch.randn(9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(precision.quadratic(delta), delta @ P @ delta, **TOL)
    # rows of eps map to rows with covariance Sigma: the root M has M M^T = Sigma
    M = precision.sample_deviations(torch.eye(9, dtype=torch.float64)).T
    torch.testing.assert_close(M @ M.T, Sigma, **TOL)
    torch.testing.assert_close(precision.covariance(), Sigma, **TOL)


def test_kron_damping_adds_the_prior_to_each_factor():
    structure, H, P = _case("kron", PRIORS["per_layer"], damping=True)
    precision = structure.precision(H, C, PRIORS["per_layer"], LAYOUT, Memo())
    torch.testing.assert_close(precision.public.to_matrix(), P, **TOL)
    torch.testing.assert_close(precision.logdet(), torch.logdet(P), **TOL)
    assert structure.spectrum(H, Memo()) is None  # no closed-form tuning


@pytest.mark.parametrize("kind", ["diag", "kron"])
def test_layer_blocks_rebuild_the_covariance(kind):
    structure, H, P = _case(kind, PRIORS["per_layer"])
    precision = structure.precision(H, C, PRIORS["per_layer"], LAYOUT, Memo())
    blocks = []
    for param, block in zip(PARAMS, precision.layer_blocks(PARAMS)):
        out = block.out_basis if block.out_basis is not None else torch.eye(3)
        if param.ndim == 2:
            inn = block.in_basis if block.in_basis is not None else torch.eye(2)
            Q = torch.kron(out.double(), inn.double())
        else:
            Q = out.double()
        blocks.append(Q @ torch.diag(block.inv.flatten()) @ Q.T)
    torch.testing.assert_close(torch.block_diag(*blocks), torch.linalg.inv(P), **TOL)


@pytest.mark.parametrize("kind", ["full", "diag", "kron"])
def test_spectrum_gives_the_logdet_for_a_scalar_prior(kind):
    structure, H, P = _case(kind, PRIORS["scalar"])
    eigenvalues, finest = structure.spectrum(H, Memo())
    delta = PRIORS["scalar"]
    torch.testing.assert_close(
        (C * eigenvalues + delta).log().sum(), torch.logdet(P), **TOL
    )
    assert finest in (1, 2, 9)


@pytest.mark.parametrize("kind", ["full", "diag", "kron", "lowrank"])
def test_saved_curvature_loads_back(kind):
    structure, H, _ = _case(kind, PRIORS["scalar"])
    like = torch.empty(0, dtype=torch.float64)
    loaded = structure.loaded(structure.saved(H), LAYOUT, like)
    flat = {
        "full": lambda h: [h],
        "diag": lambda h: [h],
        "kron": lambda h: [F for block in h.kfacs for F in block],
        "lowrank": lambda h: list(h),
    }[kind]
    for got, want in zip(flat(loaded), flat(H), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises((ValueError, TypeError), match="'H"):
        structure.loaded("not a curvature", LAYOUT, like)


def test_dense_eigenvalues_are_computed_once_per_curvature(monkeypatch):
    structure, H, _ = _case("full", PRIORS["scalar"])
    memo, calls = Memo(), []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(
        torch.linalg, "eigvalsh", lambda M: calls.append(1) or eigvalsh(M)
    )
    for prior in (1.0, 2.0, 3.0):  # a new prior: a new precision, same H
        p = torch.tensor([prior], dtype=torch.float64)
        structure.precision(H, C, p, LAYOUT, memo).logdet()
    assert len(calls) == 1
    structure.precision(H * 2, C, p, LAYOUT, memo).logdet()  # a new curvature
    assert len(calls) == 2
