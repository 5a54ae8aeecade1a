"""Tests for Kron / KronDecomposed against dense float64 ground truth.

The ground truth is built directly from the raw factors with ``torch.kron``,
``torch.block_diag`` and ``torch.linalg`` (never from our eigendecomposition).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from laplace.utils.matrix import Kron, KronDecomposed

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-9}

# Factor sizes per block: (n,) is a vector parameter, (out, in) a Kronecker pair.
LAYOUTS = {
    "mlp": [(3, 4), (3,), (2, 3), (2,)],
    "single": [(5,)],
    "one_by_one": [(4, 1), (1, 1), (1,)],
    "conv_like": [(2, 6)],
}


def _spd(n: int, g: torch.Generator, dtype=DT) -> torch.Tensor:
    B = torch.randn(n, n + 1, generator=g, dtype=DT)
    return (B @ B.T / (n + 1) + 0.5 * torch.eye(n, dtype=DT)).to(dtype)


def _factors(layout, seed: int = 0, dtype=DT) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[_spd(n, g, dtype) for n in sizes] for sizes in layout]


def _n_params(layout) -> int:
    return sum(math.prod(sizes) for sizes in layout)


def _dense_kron(blocks) -> torch.Tensor:
    return torch.block_diag(*[torch.kron(*b) if len(b) == 2 else b[0] for b in blocks])


def _dense_posterior(blocks, deltas, scale=1.0, damping=False) -> torch.Tensor:
    """scale * Kron + deltas, with damping added to each scaled factor."""
    out = []
    for block, d in zip(blocks, deltas):
        n = math.prod(F.shape[0] for F in block)
        if len(block) == 1:
            out.append(scale * block[0] + d * torch.eye(n, dtype=DT))
        elif damping:
            G, A = block
            r, s = scale**0.5, d**0.5
            out.append(
                torch.kron(
                    r * G + s * torch.eye(len(G), dtype=DT),
                    r * A + s * torch.eye(len(A), dtype=DT),
                )
            )
        else:
            out.append(scale * torch.kron(*block) + d * torch.eye(n, dtype=DT))
    return torch.block_diag(*out)


def _dense_power(M: torch.Tensor, exponent: float) -> torch.Tensor:
    if exponent == 1:
        return M
    if exponent == 2:
        return M @ M
    if exponent == -1:
        return torch.linalg.inv(M)
    w, V = torch.linalg.eigh(M)
    return V @ torch.diag(w**exponent) @ V.T


def _W(shape_kind: str, P: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"vec": (P,), "2d": (3, P), "3d": (2, 3, P)}[shape_kind]
    return torch.randn(*shape, generator=g, dtype=DT)


def _deltas(kind: str, n_blocks: int) -> torch.Tensor:
    if kind == "scalar":
        return torch.tensor(0.7, dtype=DT)
    return torch.linspace(0.2, 1.3, n_blocks, dtype=DT)


# --------------------------------------------------------------------- Kron


def test_init_from_model_layout_dtype_and_frozen_params():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(1, 4), nn.Linear(4, 2)
    )
    model = model.to(torch.float32)  # factors must follow the model, not the default
    model[3].bias.requires_grad_(False)
    K = Kron.init_from_model(model)
    shapes = [[tuple(F.shape) for F in b] for b in K.kfacs]
    assert shapes == [
        [(3, 3), (8, 8)],
        [(3, 3)],
        [(4, 4), (1, 1)],
        [(4, 4)],
        [(2, 2), (4, 4)],
    ]
    assert all((F == 0).all() for b in K.kfacs for F in b)
    assert len(K) == 5 and K.dtype == torch.float32 and K.device == torch.device("cpu")
    K64 = Kron.init_from_model(model[2].parameters(), device="cpu", dtype=DT)
    assert len(K64) == 2 and K64.dtype == DT
    with pytest.raises(ValueError, match="no"):
        Kron.init_from_model(nn.ReLU())


def test_block_convention_matches_pytorch_weight_flattening():
    # For one example, the Linear weight gradient is outer(g, x); its
    # row-major flattening times its transpose must equal kron(g g^T, x x^T).
    layer = nn.Linear(3, 2).double()
    x = torch.randn(3, dtype=DT)
    g = torch.randn(2, dtype=DT)
    (layer(x) @ g).backward()
    grad = layer.weight.grad.flatten()
    K = Kron([[torch.outer(g, g), torch.outer(x, x)]])
    torch.testing.assert_close(K.to_matrix(), torch.outer(grad, grad), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_kron_dense_quantities(layout):
    blocks = _factors(layout)
    K, M = Kron(blocks), _dense_kron(blocks)
    torch.testing.assert_close(K.to_matrix(), M, rtol=0, atol=0)
    torch.testing.assert_close(K.diag(), M.diagonal(), **TOL)
    sign, logabsdet = torch.linalg.slogdet(M)
    assert sign == 1
    torch.testing.assert_close(K.logdet(), logabsdet, **TOL)
    assert K.n_params == M.shape[0] == _n_params(layout)


@pytest.mark.parametrize("shape_kind", ["vec", "2d", "3d"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_kron_bmm(layout, shape_kind):
    blocks = _factors(layout)
    W = _W(shape_kind, _n_params(layout))
    out = Kron(blocks).bmm(W)
    assert out.shape == W.shape
    torch.testing.assert_close(out, W @ _dense_kron(blocks), **TOL)


def test_kron_bmm_errors():
    K = Kron(_factors(LAYOUTS["mlp"]))
    with pytest.raises(ValueError, match="decompose"):
        K.bmm(torch.zeros(3, K.n_params, dtype=DT), exponent=-1)
    with pytest.raises(ValueError, match="W"):
        K.bmm(torch.zeros(3, K.n_params + 1, dtype=DT))


def test_kron_add_and_sum():
    b1, b2 = _factors(LAYOUTS["mlp"], 0), _factors(LAYOUTS["mlp"], 1)
    S = Kron(b1) + Kron(b2)
    for blk, x, y in zip(S.kfacs, b1, b2):
        for F, Fx, Fy in zip(blk, x, y):
            torch.testing.assert_close(F, Fx + Fy, rtol=0, atol=0)
    torch.testing.assert_close(
        sum([Kron(b1)]).to_matrix(), _dense_kron(b1), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="layout"):
        Kron(b1) + Kron(_factors(LAYOUTS["single"]))


@pytest.mark.parametrize("scalar", [3.0, 0, torch.tensor([0.25], dtype=torch.float32)])
def test_kron_mul_is_symmetric_split(scalar):
    blocks = _factors(LAYOUTS["one_by_one"])
    s = float(scalar)
    for K in (Kron(blocks) * scalar, scalar * Kron(blocks)):
        assert K.dtype == DT
        torch.testing.assert_close(K.to_matrix(), s * _dense_kron(blocks), **TOL)
        for blk, ref in zip(K.kfacs, blocks):
            for F, R in zip(blk, ref):
                torch.testing.assert_close(F, s ** (1 / len(ref)) * R, **TOL)


@pytest.mark.parametrize("bad", [-1.0, torch.tensor(-2.0), torch.ones(2), "a"])
def test_kron_mul_rejects_bad_scalars(bad):
    K = Kron(_factors(LAYOUTS["single"]))
    with pytest.raises((ValueError, TypeError), match="scalar"):
        K * bad
    with pytest.raises((ValueError, TypeError), match="scalar"):
        K.decompose() * bad


def test_kron_constructor_validation():
    with pytest.raises(ValueError, match="square"):
        Kron([[torch.zeros(2, 3)]])
    with pytest.raises(ValueError, match="factors"):
        Kron([[torch.eye(2)] * 3])
    with pytest.raises(ValueError, match="dtype"):
        Kron([[torch.eye(2, dtype=torch.float32)], [torch.eye(2, dtype=DT)]])
    with pytest.raises(ValueError, match="empty"):
        Kron([])


def test_kron_to_and_float32_decompose():
    blocks = _factors(LAYOUTS["mlp"])
    K32 = Kron(blocks).to(torch.float32)
    assert K32.dtype == torch.float32
    kd = K32.decompose() + 0.5
    assert kd.dtype == torch.float32 and kd.logdet().dtype == torch.float32
    assert kd.bmm(torch.ones(K32.n_params, dtype=torch.float32)).dtype == torch.float32
    M = _dense_posterior(blocks, [0.5] * len(blocks))
    # float32 eigendecomposition: only single-precision agreement is possible
    torch.testing.assert_close(
        kd.to_matrix(-1).double(), torch.linalg.inv(M), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        kd.logdet().double(), torch.linalg.slogdet(M)[1], rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------- KronDecomposed


def _posterior(layout, deltas_kind, scale, damping, scale_on="decomposed"):
    blocks = _factors(layout)
    deltas = _deltas(deltas_kind, len(layout))
    if scale_on == "kron":
        kd = (Kron(blocks) * scale).decompose(damping=damping)
    else:
        kd = Kron(blocks).decompose(damping=damping) * scale
    kd = kd + deltas
    M = _dense_posterior(blocks, deltas.expand(len(layout)), scale, damping)
    return kd, M


CASES = [
    pytest.param(
        layout, deltas, scale, damping, id=f"{name}-{deltas}-s{scale}-damp{damping}"
    )
    for name, layout in LAYOUTS.items()
    for deltas in ("scalar", "per_block")
    for scale in (1.0, 2.5)
    for damping in (False, True)
]


@pytest.mark.parametrize("layout,deltas,scale,damping", CASES)
def test_decomposed_against_dense(layout, deltas, scale, damping):
    kd, M = _posterior(layout, deltas, scale, damping)
    torch.testing.assert_close(kd.logdet(), torch.linalg.slogdet(M)[1], **TOL)
    W = _W("3d", M.shape[0])
    torch.testing.assert_close(
        kd.inv_square_form(W), W @ torch.linalg.inv(M) @ W.mT, **TOL
    )
    for exponent in (-1, -0.5, 1, 2):
        Me = _dense_power(M, exponent)
        torch.testing.assert_close(kd.to_matrix(exponent), Me, **TOL)
        torch.testing.assert_close(kd.diag(exponent), Me.diagonal(), **TOL)
        torch.testing.assert_close(kd.bmm(W, exponent), W @ Me, **TOL)
    # R^T from the rows of I: R R^T is the covariance M^{-1}
    root_T = kd.covariance_root_bmm(torch.eye(M.shape[0], dtype=DT))
    torch.testing.assert_close(root_T.mT @ root_T, torch.linalg.inv(M), **TOL)
    torch.testing.assert_close(kd.covariance_root_bmm(W), W @ root_T, **TOL)


@pytest.mark.parametrize("damping", [False, True])
def test_scaling_kron_or_decomposed_agree(damping):
    kd_a, M = _posterior(LAYOUTS["mlp"], "per_block", 3.0, damping, scale_on="kron")
    kd_b, _ = _posterior(LAYOUTS["mlp"], "per_block", 3.0, damping)
    torch.testing.assert_close(kd_a.to_matrix(), M, **TOL)
    torch.testing.assert_close(kd_b.to_matrix(), M, **TOL)


@pytest.mark.parametrize("shape_kind", ["vec", "2d", "3d"])
def test_decomposed_w_shapes(shape_kind):
    kd, M = _posterior(LAYOUTS["one_by_one"], "per_block", 1.0, False)
    W = _W(shape_kind, M.shape[0])
    out = kd.bmm(W)
    assert out.shape == W.shape
    torch.testing.assert_close(out, W @ torch.linalg.inv(M), **TOL)
    expected = (
        W @ torch.linalg.inv(M) @ W.mT if W.ndim > 1 else W @ torch.linalg.inv(M) @ W
    )
    sq = kd.inv_square_form(W)
    assert sq.shape == W.shape[:-1] + W.shape[-2:-1]
    torch.testing.assert_close(sq, expected, **TOL)
    with pytest.raises(ValueError, match="W"):
        kd.bmm(torch.zeros(M.shape[0] + 1, dtype=DT))


def test_deltas_accumulate_and_validate():
    blocks = _factors(LAYOUTS["mlp"])
    kd = Kron(blocks).decompose()
    assert kd.deltas.shape == (4,) and (kd.deltas == 0).all()
    kd2 = kd + 0.5 + torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    torch.testing.assert_close(
        kd2.deltas, torch.tensor([0.6, 0.7, 0.8, 0.9], dtype=DT), **TOL
    )
    torch.testing.assert_close(
        kd2.to_matrix(), _dense_posterior(blocks, kd2.deltas), **TOL
    )
    assert (kd.deltas == 0).all()  # adding returns a new object
    with pytest.raises(ValueError, match="deltas"):
        kd + torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="layouts"):
        KronDecomposed([[torch.eye(2)]], [[torch.ones(3)]])


@pytest.mark.parametrize("damping", [False, True])
def test_logdet_gradients(damping):
    layout = LAYOUTS["mlp"]
    blocks = _factors(layout)
    kd = Kron(blocks).decompose(damping=damping)
    deltas = torch.linspace(0.2, 1.3, len(layout), dtype=DT, requires_grad=True)
    scale = torch.tensor(1.7, dtype=DT, requires_grad=True)
    (kd * scale + deltas).logdet().backward()
    dense_d = deltas.detach().clone().requires_grad_(True)
    dense_s = scale.detach().clone().requires_grad_(True)
    torch.linalg.slogdet(_dense_posterior(blocks, dense_d, dense_s, damping))[
        1
    ].backward()
    torch.testing.assert_close(deltas.grad, dense_d.grad, **TOL)
    torch.testing.assert_close(scale.grad, dense_s.grad, **TOL)
    # central finite differences of the implementation itself
    h = 1e-6
    with torch.no_grad():
        for b in range(len(layout)):
            e = torch.zeros(len(layout), dtype=DT)
            e[b] = h
            fd = (
                (kd * scale + (deltas + e)).logdet()
                - (kd * scale + (deltas - e)).logdet()
            ) / (2 * h)
            torch.testing.assert_close(deltas.grad[b], fd, rtol=1e-6, atol=1e-8)


def test_detach_len_device_dtype():
    blocks = _factors(LAYOUTS["mlp"])
    d = torch.tensor(0.3, dtype=DT, requires_grad=True)
    kd = Kron(blocks).decompose() + d
    assert kd.logdet().requires_grad and not kd.detach().logdet().requires_grad
    assert len(kd) == 4 and kd.dtype == DT and kd.device == torch.device("cpu")
    assert kd.to(torch.float32).diag().dtype == torch.float32


@pytest.mark.parametrize("damping", [False, True])
def test_zero_curvature_plus_prior(damping):
    # Fresh factors plus a prior: only the prior remains (damping: sqrt(d)^2 = d).
    K = Kron.init_from_model(nn.Linear(3, 2).to(DT))
    assert K.logdet() == -math.inf
    kd = K.decompose(damping=damping) + torch.tensor([2.0, 0.5], dtype=DT)
    expected = torch.cat(
        [torch.full((6,), 2.0, dtype=DT), torch.full((2,), 0.5, dtype=DT)]
    )
    torch.testing.assert_close(kd.to_matrix(), torch.diag(expected), **TOL)
    torch.testing.assert_close(kd.logdet(), expected.log().sum(), **TOL)


@pytest.mark.gpu
def test_cuda_device_is_kept():
    blocks = _factors(LAYOUTS["mlp"])
    cuda = [[F.cuda() for F in b] for b in blocks]
    kd = Kron(cuda).decompose(damping=True) * torch.tensor(2.0) + torch.tensor(0.5)
    W = _W("3d", _n_params(LAYOUTS["mlp"]))
    outs = [kd.bmm(W.cuda()), kd.inv_square_form(W.cuda()), kd.diag(-1), kd.logdet()]
    outs += [Kron(cuda).bmm(W.cuda()), Kron(cuda).logdet(), (Kron(cuda) * 2.0).diag()]
    assert all(out.device.type == "cuda" and out.dtype == DT for out in outs)
    M = _dense_posterior(blocks, [0.5] * len(blocks), 2.0, damping=True)
    torch.testing.assert_close(outs[0].cpu(), W @ torch.linalg.inv(M), **TOL)


# ------------------------------------------------------ property-based tests

block_sizes = st.one_of(
    st.tuples(st.integers(1, 4)), st.tuples(st.integers(1, 4), st.integers(1, 4))
)
problems = st.fixed_dictionaries(
    {
        "layout": st.lists(block_sizes, min_size=1, max_size=3),
        "seed": st.integers(0, 2**16),
        "damping": st.booleans(),
        "delta": st.floats(0.1, 2.0),
        "scale": st.floats(0.2, 3.0),
    }
)


@settings(max_examples=25, deadline=None)
@given(problems, st.sampled_from([-1, -0.5, 1, 2]))
def test_property_decomposed(p, exponent):
    blocks = _factors(p["layout"], p["seed"])
    kd = Kron(blocks).decompose(damping=p["damping"]) * p["scale"] + p["delta"]
    M = _dense_posterior(blocks, [p["delta"]] * len(blocks), p["scale"], p["damping"])
    P = M.shape[0]
    W = _W("3d", P, seed=p["seed"])
    torch.testing.assert_close(kd.bmm(kd.bmm(W, -1), 1), W, **TOL)
    torch.testing.assert_close(
        kd.to_matrix(-1) @ kd.to_matrix(), torch.eye(P, dtype=DT), **TOL
    )
    torch.testing.assert_close(kd.logdet(), torch.linalg.slogdet(M)[1], **TOL)
    torch.testing.assert_close(
        kd.diag(exponent), _dense_power(M, exponent).diagonal(), **TOL
    )


@settings(max_examples=25, deadline=None)
@given(problems)
def test_property_kron(p):
    blocks = _factors(p["layout"], p["seed"])
    K = Kron(blocks) * p["scale"]
    M = p["scale"] * _dense_kron(blocks)
    W = _W("2d", M.shape[0], seed=p["seed"])
    torch.testing.assert_close(K.bmm(W), W @ M, **TOL)
    torch.testing.assert_close(K.diag(), M.diagonal(), **TOL)
    torch.testing.assert_close(K.logdet(), torch.linalg.slogdet(M)[1], **TOL)
