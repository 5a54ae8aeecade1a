"""Tests for laplace.utils.linalg against dense float64 torch results."""

from __future__ import annotations

import pytest
import torch

from laplace.utils.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    symeig,
)

DT = torch.float64
TOL = {"rtol": 1e-8, "atol": 1e-10}


def _spd(n: int, seed: int, rank: int | None = None, dtype=DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, rank or n, generator=g, dtype=DT)
    M = B @ B.T + (0 if rank else 0.1) * torch.eye(n, dtype=DT)
    return M.to(dtype)


def test_kron_matches_definition():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, generator=g, dtype=DT)
    B = torch.randn(4, 5, generator=g, dtype=DT)
    K = kron(A, B)
    assert K.shape == (8, 15)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(
                K[4 * i : 4 * i + 4, 5 * j : 5 * j + 5], A[i, j] * B, **TOL
            )


def test_block_diag_matches_definition():
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(n, n, generator=g, dtype=DT) for n in (1, 3, 2)]
    M = block_diag(blocks)
    assert M.shape == (6, 6) and M.dtype == DT
    expected = torch.zeros(6, 6, dtype=DT)
    expected[0:1, 0:1], expected[1:4, 1:4], expected[4:6, 4:6] = blocks
    torch.testing.assert_close(M, expected, rtol=0, atol=0)


def test_block_diag_rejects_empty():
    with pytest.raises(ValueError, match="blocks"):
        block_diag([])


@pytest.mark.parametrize("value", [0.5, torch.tensor(-2.0, dtype=DT)])
@pytest.mark.parametrize("shape", [(4, 4), (3, 4, 4)])
def test_diagonal_add_scalar(value, shape):
    X = torch.randn(*shape, dtype=DT)
    X_before = X.clone()
    out = diagonal_add_scalar(X, value)
    torch.testing.assert_close(out, X + value * torch.eye(4, dtype=DT), **TOL)
    torch.testing.assert_close(X, X_before, rtol=0, atol=0)  # input untouched


def test_diagonal_add_scalar_is_differentiable():
    X = torch.randn(3, 3, dtype=DT)
    v = torch.tensor(0.3, dtype=DT, requires_grad=True)
    diagonal_add_scalar(X, v).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor(3.0, dtype=DT), rtol=0, atol=0)


def test_diagonal_add_scalar_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        diagonal_add_scalar(torch.zeros(2, 3), 1.0)


@pytest.mark.parametrize("n,rank", [(1, None), (5, None), (6, 2)])
def test_symeig_reconstructs(n, rank):
    M = _spd(n, seed=n, rank=rank)
    vals, vecs = symeig(M)
    assert vals.shape == (n,) and vecs.shape == (n, n)
    assert (vals >= 0).all()
    torch.testing.assert_close(
        vals, torch.linalg.eigvalsh(M).clamp(min=0), rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(
        vecs @ torch.diag(vals) @ vecs.T, M, rtol=1e-8, atol=1e-10
    )
    torch.testing.assert_close(
        vecs.T @ vecs, torch.eye(n, dtype=DT), rtol=0, atol=1e-12
    )


def test_symeig_clamps_negative_round_off():
    M = torch.diag(torch.tensor([-1e-12, 0.0, 2.0], dtype=DT))
    vals, _ = symeig(M)
    torch.testing.assert_close(
        vals, torch.tensor([0.0, 0.0, 2.0], dtype=DT), rtol=0, atol=0
    )


def test_symeig_batched():
    M = torch.stack([_spd(3, seed=s) for s in range(4)])
    vals, vecs = symeig(M)
    torch.testing.assert_close(
        vecs @ torch.diag_embed(vals) @ vecs.mT, M, rtol=1e-8, atol=1e-10
    )


def _failing_eigh(monkeypatch, fail_when):
    real = torch.linalg.eigh
    calls = []

    def eigh(A, *args, **kwargs):
        calls.append(A.dtype)
        if fail_when(A, len(calls)):
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def test_symeig_retries_with_jitter(monkeypatch):
    M = _spd(4, seed=3)
    calls = _failing_eigh(monkeypatch, lambda A, i: i == 1)
    vals, vecs = symeig(M)
    assert len(calls) == 2
    # the jitter is subtracted again, so the spectrum is exact up to round-off
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(M), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        vecs @ torch.diag(vals) @ vecs.T, M, rtol=1e-8, atol=1e-10
    )


def test_symeig_float32_falls_back_to_float64(monkeypatch):
    M = _spd(4, seed=4, dtype=torch.float32)
    calls = _failing_eigh(monkeypatch, lambda A, i: A.dtype == torch.float32)
    vals, vecs = symeig(M)
    assert calls == [torch.float32, torch.float32, torch.float64]
    assert vals.dtype == vecs.dtype == torch.float32
    # float32 output of a float64 computation: compare at float32 precision
    torch.testing.assert_close(
        vals.double(), torch.linalg.eigvalsh(M.double()), rtol=1e-5, atol=1e-5
    )


def test_symeig_float64_failure_raises(monkeypatch):
    _failing_eigh(monkeypatch, lambda A, i: True)
    with pytest.raises(torch.linalg.LinAlgError):
        symeig(_spd(3, seed=0))


def test_symeig_bfloat16_keeps_dtype():
    M = _spd(3, seed=5)
    vals, vecs = symeig(M.to(torch.bfloat16))
    assert vals.dtype == vecs.dtype == torch.bfloat16
    # bfloat16 has ~3 significant digits; only a coarse check is meaningful
    torch.testing.assert_close(
        vals.double(), torch.linalg.eigvalsh(M), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("n", [1, 4])
def test_invsqrt_precision(n):
    M = _spd(n, seed=10 + n)
    S = invsqrt_precision(M)
    torch.testing.assert_close(S @ S.T, torch.linalg.inv(M), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(S, S.triu(), rtol=0, atol=0)
    L = torch.linalg.cholesky(M)
    torch.testing.assert_close(S, torch.linalg.inv(L).T, rtol=1e-8, atol=1e-10)


def test_invsqrt_precision_batched_and_not_pd():
    M = torch.stack([_spd(3, seed=s) for s in range(2)])
    S = invsqrt_precision(M)
    torch.testing.assert_close(S @ S.mT, torch.linalg.inv(M), rtol=1e-8, atol=1e-10)
    with pytest.raises(torch.linalg.LinAlgError, match="positive"):
        invsqrt_precision(-torch.eye(2, dtype=DT))
