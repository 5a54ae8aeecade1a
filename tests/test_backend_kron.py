"""KFAC of the BackPACK and ASDL backends: exact cases, cross-backend agreement,
BackPACK's convolution factors and batch additivity."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from test_backends import (
    DT,
    LIKS,
    TOL,
    DictModel,
    Reference,
    block_diagonal,
    case,
    kron_dense,
    make_data,
    make_model,
)
from torch import nn

from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
)

GGN_KRON = [BackPackGGN, AsdlGGN]
KRON = [BackPackGGN, AsdlGGN, AsdlEF]


def assert_kron_close(kron, expected) -> None:
    assert len(kron.kfacs) == len(expected.kfacs)
    for block, ref_block in zip(kron.kfacs, expected.kfacs):
        assert len(block) == len(ref_block)
        for F, F_ref in zip(block, ref_block):
            torch.testing.assert_close(F, F_ref, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", GGN_KRON)
def test_exact_for_single_linear_layer(backend, bias):
    """One linear layer, one regression output: the output Hessian is 1, so
    ``G = N`` and ``G kron A`` is the exact weight block; without a bias that is
    the whole GGN."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=bias).to(DT)
    x, y = make_data("mlp", "regression", 1, n=7)
    ref = Reference(model, x, y, "regression")
    loss, kron = backend(model, "regression").kron(x, y, N=7)
    expected = block_diagonal(ref.ggn, ref.shapes) if bias else ref.ggn
    torch.testing.assert_close(kron_dense(kron), expected, **TOL)
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("name", ["mlp", "frozen"])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("backend", KRON)
def test_exact_on_one_data_point(backend, likelihood, n_out, name):
    """For one data point each KFAC block is the exact GGN / EF block."""
    model, x, y, ref = case(name, likelihood, n_out, n=1)
    loss, kron = backend(model, likelihood).kron(x, y, N=1)
    expected = ref.ef if backend is AsdlEF else ref.ggn
    torch.testing.assert_close(
        kron_dense(kron), block_diagonal(expected, ref.shapes), **TOL
    )
    torch.testing.assert_close(loss, ref.loss, **TOL)


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("name", ["mlp", "frozen"])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_backends_agree_on_linear_layers(likelihood, n_out, name, stochastic):
    """BackPACK KFLR, ASDL exact-Fisher KFAC and curvlinops type-2 KFAC agree
    factor by factor (N differs from the batch size to check the scaling).
    Monte-Carlo variants agree in the input factors ``A`` (same data)."""
    model, x, y, _ = case(name, likelihood, n_out)
    kw = {"stochastic": stochastic, "num_samples": 3}
    expected = CurvlinopsGGN(model, likelihood, **kw).kron(x, y, N=11)[1]
    for backend in GGN_KRON:
        _, kron = backend(model, likelihood, **kw).kron(x, y, N=11)
        if not stochastic:
            assert_kron_close(kron, expected)
            continue
        for block, ref_block in zip(kron.kfacs, expected.kfacs):
            if len(block) == 2:
                torch.testing.assert_close(block[1], ref_block[1], **TOL)


@pytest.mark.parametrize("name", ["mlp", "cnn", "frozen"])
@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_asdl_ef_agrees_with_curvlinops(likelihood, n_out, name):
    model, x, y, _ = case(name, likelihood, n_out)
    _, kron = AsdlEF(model, likelihood).kron(x, y, N=11)
    assert_kron_close(kron, CurvlinopsEF(model, likelihood).kron(x, y, N=11)[1])


@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_asdl_matches_kfac_expand_with_weight_sharing(likelihood, n_out):
    """Convolutions and linear layers on `(batch, positions, in)` inputs: ASDL's
    factors are rescaled to curvlinops' KFAC-expand."""
    for name in ["cnn", "sequence"]:
        if name == "cnn":
            model, x, y, _ = case("cnn", likelihood, n_out)
        else:
            torch.manual_seed(0)
            model = nn.Sequential(
                nn.Linear(3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, n_out)
            ).to(DT)
            x = torch.randn(5, 4, 3, dtype=DT)
            y = make_data("mlp", likelihood, n_out)[1]
        _, kron = AsdlGGN(model, likelihood).kron(x, y, N=11)
        expected = CurvlinopsGGN(model, likelihood, kfac_approx="expand").kron(
            x, y, N=11
        )[1]
        assert_kron_close(kron, expected)


@pytest.mark.parametrize("likelihood,n_out", LIKS)
def test_backpack_convolution_factors(likelihood, n_out):
    """BackPACK's conv KFAC: ``G`` is the exact GGN block of the bias (BackPACK's
    definition) and ``A`` the unfolded-input covariance over the N data points
    and the T output positions (rescaled here to KFAC-expand's scale)."""
    model, x, y, ref = case("cnn", likelihood, n_out)
    _, kron = BackPackGGN(model, likelihood).kron(x, y, N=11)
    conv = model[0]
    bias_start = conv.weight.numel()
    bias_block = ref.ggn[bias_start : bias_start + 2, bias_start : bias_start + 2]
    patches = nn.functional.unfold(x, conv.kernel_size)  # (n, C_in k k, T)
    T = patches.shape[-1]
    A = torch.einsum("nit,njt->ij", patches, patches) / (11 * T)
    torch.testing.assert_close(kron.kfacs[0][0], bias_block, **TOL)
    torch.testing.assert_close(kron.kfacs[0][1], A, **TOL)
    torch.testing.assert_close(kron.kfacs[1][0], bias_block, **TOL)
    # the linear layer after the convolution agrees with curvlinops
    expected = CurvlinopsGGN(model, likelihood).kron(x, y, N=11)[1]
    for block, ref_block in zip(kron.kfacs[2:], expected.kfacs[2:]):
        for F, F_ref in zip(block, ref_block):
            torch.testing.assert_close(F, F_ref, **TOL)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("backend", KRON)
def test_batches_sum_to_full_data(backend, name):
    """Factor-wise sums over batches give the one-batch KFAC of all data."""
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


@pytest.mark.parametrize(
    "backend,reference", [(AsdlGGN, CurvlinopsGGN), (AsdlEF, CurvlinopsEF)]
)
def test_asdl_dict_inputs(backend, reference):
    model = DictModel(3)
    x, y = make_data("mlp", "classification", 3)
    batch = UserDict({"input_ids": x, "labels": y})
    _, kron = backend(model, "classification").kron(batch, y, N=9)
    assert_kron_close(kron, reference(model, "classification").kron(batch, y, N=9)[1])
