"""KFAC and Hessian of the curvlinops backends against independent references."""

from __future__ import annotations

import pytest
import torch
from curvlinops import FisherType, KFACLinearOperator
from test_curvature import LIKS, MODELS, TOL, case, make_data, make_model, reference
from torch import nn

from laplace.curvature import (
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
    CurvlinopsInterface,
)

KRON_BACKENDS = [CurvlinopsGGN, CurvlinopsEF]


def kron_dense(kron) -> torch.Tensor:
    """Block-diagonal dense matrix of Kron blocks ``[G, A]`` / ``[G]``."""
    return torch.block_diag(
        *[torch.kron(*b) if len(b) == 2 else b[0] for b in kron.kfacs]
    )


def block_diagonal(H: torch.Tensor, shapes) -> torch.Tensor:
    """Keep only the per-parameter diagonal blocks of ``H``."""
    sizes = [s.numel() for s in shapes]
    blocks = [
        H[i : i + n, i : i + n]
        for i, n in zip(torch.tensor([0] + sizes).cumsum(0).tolist(), sizes)
    ]
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_hessian_full(likelihood, n_out, name):
    model, x, y, ref = case(name, likelihood, n_out)
    loss, H = CurvlinopsHessian(model, likelihood).full(x, y)
    torch.testing.assert_close(H, ref.hess, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


def test_hessian_subnetwork_and_missing_structures():
    model, x, y, ref = case("mlp", "classification", 3)
    idx = torch.tensor([1, 5, 9, 22])
    curv = CurvlinopsHessian(model, "classification", subnetwork_indices=idx)
    torch.testing.assert_close(curv.full(x, y)[1], ref.hess[idx][:, idx], **TOL)
    with pytest.raises(NotImplementedError, match="CurvlinopsGGN"):
        curv.diag(x, y)
    with pytest.raises(NotImplementedError, match="kron"):
        curv.kron(x, y, N=5)


@pytest.mark.parametrize("name", ["mlp", "frozen"])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend", KRON_BACKENDS)
def test_kfac_exact_on_one_data_point(backend, likelihood, n_out, name):
    """For one data point and layers without weight sharing, each KFAC block
    equals the corresponding diagonal block of the exact GGN / EF."""
    model, x, y, ref = case(name, likelihood, n_out, n=1)
    loss, kron = backend(model, likelihood).kron(x, y, N=1)
    expected = ref.ggn if backend is CurvlinopsGGN else ref.ef
    torch.testing.assert_close(
        kron_dense(kron), block_diagonal(expected, ref.shapes), **TOL
    )
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_exact_for_single_linear_layer_regression(bias):
    """One linear layer, one output: G is a scalar, so KFAC is exact per block
    (and equals the whole GGN without a bias)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=bias).double()
    x, y = make_data("mlp", "regression", 1, n=7)
    ref = reference(model, x, y, "regression")
    _, kron = CurvlinopsGGN(model, "regression").kron(x, y, N=7)
    expected = block_diagonal(ref.ggn, ref.shapes) if bias else ref.ggn
    torch.testing.assert_close(kron_dense(kron), expected, **TOL)


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend", KRON_BACKENDS)
def test_kfac_layout_matches_curvlinops_operator(
    backend, likelihood, n_out, name, kfac_approx
):
    """Block order, flattening and scaling agree with curvlinops' own KFAC
    operator applied to the identity (rescaled to the 0.5 * SSE loss)."""
    model = make_model(name, n_out)
    x, y = make_data(name, likelihood, n_out)
    curv = backend(model, likelihood, kfac_approx=kfac_approx)
    _, kron = curv.kron(x, y, N=5)
    fisher_type = FisherType.TYPE2 if backend is CurvlinopsGGN else FisherType.EMPIRICAL
    op = KFACLinearOperator(
        model,
        curv.lossfunc,
        curv.params,
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        check_deterministic=False,
    )
    scale = curv.factor if backend is CurvlinopsGGN else curv.factor**2
    P = sum(p.numel() for p in curv.params)
    expected = scale * (op @ torch.eye(P, dtype=x.dtype))
    torch.testing.assert_close(kron_dense(kron), expected, **TOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", KRON_BACKENDS)
def test_kfac_batches_sum_to_full_data(backend, name):
    """Input factors are divided by the data set size N, gradient factors are
    sums: factor-wise sums over batches give the one-batch KFAC of all data."""
    model = make_model(name, 3)
    x, y = make_data(name, "classification", 3, n=6)
    curv = backend(model, "classification")
    loss_all, kron_all = curv.kron(x, y, N=6)
    loss1, kron1 = curv.kron(x[:2], y[:2], N=6)
    loss2, kron2 = curv.kron(x[2:], y[2:], N=6)
    torch.testing.assert_close(loss1 + loss2, loss_all, **TOL)
    for b_all, b1, b2 in zip(kron_all.kfacs, kron1.kfacs, kron2.kfacs):
        for F_all, F1, F2 in zip(b_all, b1, b2):
            torch.testing.assert_close(F1 + F2, F_all, **TOL)
    torch.testing.assert_close(kron_dense(kron1 + kron2), kron_dense(kron_all), **TOL)


@pytest.mark.parametrize("layer_cls", [nn.LayerNorm, nn.BatchNorm1d])
@pytest.mark.parametrize("backend", KRON_BACKENDS)
def test_kfac_refuses_unsupported_layers(backend, layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(4).eval()
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = make_data("mlp", "classification", 2)
    with pytest.raises(ValueError, match=type(layer).__name__ + ".*diag"):
        backend(model, "classification").kron(x, y, N=5)
    # Frozen, the layer is no longer part of the curvature and KFAC works.
    layer.requires_grad_(False)
    _, kron = backend(model, "classification").kron(x, y, N=5)
    assert len(kron.kfacs) == 4


def test_kfac_refuses_embedding_and_shared_parameters():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    x, y = torch.randint(5, (4, 2)), torch.randint(2, (4,))
    with pytest.raises(ValueError, match="Embedding"):
        CurvlinopsGGN(model, "classification").kron(x, y, N=4)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    x, y = make_data("mlp", "classification", 3)
    with pytest.raises(ValueError, match="shared"):
        CurvlinopsGGN(model=tied, likelihood="classification").kron(x, y, N=5)


def test_kfac_rejects_bad_arguments():
    model, x, y, _ = case("mlp", "classification", 3)
    with pytest.raises(ValueError, match="kfac_approx"):
        CurvlinopsGGN(model, "classification", kfac_approx="full")
    with pytest.raises(ValueError, match="N"):
        CurvlinopsGGN(model, "classification").kron(x, y, N=0)
    with pytest.raises(NotImplementedError, match="CurvlinopsGGN"):
        CurvlinopsInterface(model, "classification").full(x, y)


@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
def test_stochastic_kfac_is_unbiased(likelihood, n_out):
    """MC-KFAC is random: with many labels per point its factors approach the
    type-2 factors (relative error ~ 1/sqrt(mc_samples)); a seeded generator
    makes it reproducible."""
    model, x, y, _ = case("mlp", likelihood, n_out)
    exact = kron_dense(CurvlinopsGGN(model, likelihood).kron(x, y, N=5)[1])

    def mc(seed):
        gen = torch.Generator().manual_seed(seed)
        curv = CurvlinopsGGN(
            model, likelihood, stochastic=True, mc_samples=200, generator=gen
        )
        return kron_dense(curv.kron(x, y, N=5)[1])

    H = mc(0)
    assert (H - exact).norm() / exact.norm() < 0.15
    torch.testing.assert_close(mc(0), H, **TOL)


@pytest.mark.parametrize("backend", KRON_BACKENDS)
def test_kfac_last_layer_on_features(backend):
    from test_curvature import LastLayerStub

    model = LastLayerStub(3).double()
    x, y = make_data("mlp", "classification", 3, n=1)
    phi = model.forward_with_features(x)[1].detach()
    ref = reference(model.last_layer, phi, y, "classification")
    _, kron = backend(model, "classification", last_layer=True).kron(phi, y, N=1)
    expected = ref.ggn if backend is CurvlinopsGGN else ref.ef
    torch.testing.assert_close(
        kron_dense(kron), block_diagonal(expected, ref.shapes), **TOL
    )
