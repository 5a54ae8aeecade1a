"""Kron with 1-d factors meaning diag(d), ``tensor + KronDecomposed`` and
``Kron.init_from_model`` by keyword (issue 13.8), against dense matrices."""

import pytest
import torch
from torch import nn

from laplace.utils import Kron, KronDecomposed


def _spd(n, gen):
    A = torch.randn(n, n, generator=gen)
    return A @ A.T + 0.5 * torch.eye(n)


def _positive(n, gen):
    return torch.rand(n, generator=gen) + 0.3


def _kron_and_dense(seed=0, vectors=True):
    """Blocks [G, diag d], [diag d], [diag d, A], [G] (or all matrices)."""
    gen = torch.Generator().manual_seed(seed)
    G1, d1, d2, d3, A3, G4 = (
        _spd(3, gen),
        _positive(4, gen),
        _positive(2, gen),
        _positive(2, gen),
        _spd(3, gen),
        _spd(2, gen),
    )
    if not vectors:
        d1, d2, d3 = torch.diag(d1), torch.diag(d2), torch.diag(d3)
    kfacs = [[G1, d1], [d2], [d3, A3], [G4]]
    return Kron(kfacs), _dense_of(kfacs)


def _as_matrix(F):
    return torch.diag(F) if F.ndim == 1 else F


def _dense_of(kfacs):
    blocks = []
    for block in kfacs:
        mats = [_as_matrix(F) for F in block]
        blocks.append(torch.kron(*mats) if len(mats) == 2 else mats[0])
    return torch.block_diag(*blocks)


def test_kron_with_vector_factors_equals_dense():
    K, M = _kron_and_dense()
    P = M.shape[0]
    assert K.n_params == P == 12 + 2 + 6 + 2
    torch.testing.assert_close(K.to_matrix(), M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(K.diag(), M.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(K.logdet(), torch.logdet(M), rtol=1e-10, atol=0)
    gen = torch.Generator().manual_seed(5)
    for shape in [(3, 2, P), (4, P), (P,)]:
        W = torch.randn(shape, generator=gen)
        torch.testing.assert_close(K.bmm(W), W @ M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((K * 2.5).to_matrix(), 2.5 * M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((0.5 * K).to_matrix(), 0.5 * M, rtol=1e-12, atol=1e-12)


def test_decompose_vector_factor_is_its_own_eigendecomposition():
    K, M = _kron_and_dense()
    D = K.decompose()
    d1 = K.kfacs[0][1]
    assert torch.equal(D.eigenvalues[0][1], d1)
    assert torch.equal(D.eigenvectors[0][1], torch.eye(len(d1)))
    assert torch.equal(D.eigenvalues[1][0], K.kfacs[1][0])
    torch.testing.assert_close(D.to_matrix(), M, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(D.logdet(), torch.logdet(M), rtol=1e-10, atol=0)
    deltas = torch.tensor([0.3, 0.7, 1.1, 0.2])
    sizes = [12, 2, 6, 2]
    Md = M + torch.diag(torch.repeat_interleave(deltas, torch.tensor(sizes)))
    Dd = D + deltas
    torch.testing.assert_close(Dd.to_matrix(), Md, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Dd.logdet(), torch.logdet(Md), rtol=1e-10, atol=0)
    W = torch.randn(3, 2, M.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        Dd.bmm(W, exponent=-1), W @ torch.linalg.inv(Md), rtol=1e-9, atol=1e-11
    )
    torch.testing.assert_close(
        Dd.diag(exponent=-1), torch.linalg.inv(Md).diagonal(), rtol=1e-9, atol=0
    )


def test_damped_decomposition_adds_root_delta_to_each_factor():
    K, _ = _kron_and_dense(vectors=True)
    deltas = torch.tensor([0.3, 0.7, 1.1, 0.2])
    damped = K.decompose(damping=True) + deltas
    expected = []
    for block, delta in zip(K.kfacs, deltas):
        mats = [_as_matrix(F) for F in block]
        if len(mats) == 2:
            eyes = [delta.sqrt() * torch.eye(len(F)) for F in mats]
            expected.append(torch.kron(mats[0] + eyes[0], mats[1] + eyes[1]))
        else:
            expected.append(mats[0] + delta * torch.eye(len(mats[0])))
    torch.testing.assert_close(
        damped.to_matrix(), torch.block_diag(*expected), rtol=1e-10, atol=1e-10
    )


def test_add_vector_and_matrix_factors():
    """``+`` sums factor by factor (accumulation of KFAC factors); a vector
    factor enters as ``diag(d)``."""
    K1, _ = _kron_and_dense(seed=0, vectors=True)
    K2, _ = _kron_and_dense(seed=1, vectors=False)
    K3, _ = _kron_and_dense(seed=2, vectors=True)
    expected = _dense_of(
        [
            [_as_matrix(F) + _as_matrix(H) for F, H in zip(b1, b2)]
            for b1, b2 in zip(K1.kfacs, K2.kfacs)
        ]
    )
    torch.testing.assert_close((K1 + K2).to_matrix(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close((K2 + K1).to_matrix(), expected, rtol=1e-12, atol=0)
    both = K1 + K3
    assert both.kfacs[1][0].ndim == 1  # vector + vector stays a vector
    torch.testing.assert_close(
        both.kfacs[0][1], K1.kfacs[0][1] + K3.kfacs[0][1], rtol=0, atol=0
    )
    torch.testing.assert_close(sum([K1, K3]).to_matrix(), both.to_matrix())
    with pytest.raises(ValueError, match="layout"):
        K1 + Kron([[torch.ones(3)]])


@pytest.mark.parametrize(
    "left", [0.4, 2, torch.tensor(0.4), torch.tensor([0.4, 0.1, 0.2, 0.9])]
)
def test_tensor_plus_kron_decomposed(left):
    K, M = _kron_and_dense()
    D = K.decompose()
    right = D + left
    reflected = left + D
    assert isinstance(reflected, KronDecomposed)
    torch.testing.assert_close(reflected.deltas, right.deltas, rtol=0, atol=0)
    torch.testing.assert_close(reflected.to_matrix(), right.to_matrix())
    deltas = torch.as_tensor(left, dtype=M.dtype).expand(4)
    sizes = torch.tensor([12, 2, 6, 2])
    dense = M + torch.diag(torch.repeat_interleave(deltas, sizes))
    torch.testing.assert_close(reflected.to_matrix(), dense, rtol=1e-10, atol=1e-10)


def test_init_from_model_by_keyword():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(4, 2, 3))
    model[0].bias.requires_grad_(False)
    K = Kron.init_from_model(model=model, device="cpu", dtype=torch.float32)
    shapes = [[tuple(F.shape) for F in block] for block in K.kfacs]
    assert shapes == [[(4, 4), (3, 3)], [(2, 2), (12, 12)], [(2, 2)]]
    assert all(F.dtype == torch.float32 and not F.any() for b in K.kfacs for F in b)
    params = [p for p in model.parameters() if p.requires_grad]
    same = Kron.init_from_model(model=params)
    assert [[F.shape for F in b] for b in same.kfacs] == [
        [F.shape for F in b] for b in K.kfacs
    ]
    assert same.dtype == params[0].dtype
