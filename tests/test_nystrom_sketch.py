"""The streaming Nystrom sketch against dense eigendecompositions."""

import pytest
import torch

from laplace.utils.nystrom_sketch import NystromSketch, nystrom_eigenpairs


def _psd(eigenvalues, seed=0):
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (Q * eigenvalues) @ Q.T


def _top(H, k):
    evals, evecs = torch.linalg.eigh(H)
    return evecs[:, -k:].flip(-1), evals[-k:].flip(-1)


def _subspace_gap(U, V):
    """Largest principal-angle sine between the column spans of U and V."""
    return torch.linalg.matrix_norm(U - V @ (V.T @ U), ord=2)


def test_low_rank_operator_is_recovered_exactly():
    evals = torch.cat([torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5]), torch.zeros(95)])
    H = _psd(evals.double())
    U, lam = nystrom_eigenpairs(
        lambda V: H @ V,
        100,
        5,
        oversampling=3,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(lam, evals[:5].double(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((U * lam) @ U.T, H, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_streamed_terms_equal_one_pass_over_the_sum():
    g = torch.Generator().manual_seed(2)
    terms = [
        (lambda A: A @ A.T)(torch.randn(60, 4, generator=g, dtype=torch.float64))
        for _ in range(5)
    ]
    sketch = NystromSketch.gaussian(60, 25, torch.Generator().manual_seed(3))
    for H_b in terms:
        sketch.add(H_b @ sketch.test_matrix)
    one = NystromSketch(sketch.test_matrix)
    one.add(sum(terms) @ one.test_matrix)
    for a, b in zip(sketch.eigenpairs(8), one.eigenpairs(8)):
        torch.testing.assert_close(a.abs(), b.abs(), rtol=1e-10, atol=1e-12)
    # rank of the sum is 20 <= 25 columns: exact
    U, lam = sketch.eigenpairs(20)
    torch.testing.assert_close((U * lam) @ U.T, sum(terms), rtol=0, atol=1e-9)


@pytest.mark.parametrize("power_iterations", [0, 1, 2])
def test_decaying_spectrum_leading_eigenpairs(power_iterations):
    n, k = 200, 8
    evals = torch.arange(1, n + 1, dtype=torch.float64) ** -3.0
    H = _psd(evals, seed=4)
    U, lam = nystrom_eigenpairs(
        lambda V: H @ V,
        n,
        k,
        oversampling=12,
        power_iterations=power_iterations,
        generator=torch.Generator().manual_seed(5),
    )
    V, mu = _top(H, k)
    # Nystrom eigenvalues never exceed the true ones (it is a lower bound in the
    # Loewner order) and approach them quickly for a fast-decaying spectrum
    assert (lam <= mu * (1 + 1e-12)).all()
    rel = ((mu - lam) / mu)[:4]
    bound = [3e-2, 1e-5, 1e-9][power_iterations]
    assert rel.max() < bound, rel
    assert _subspace_gap(U[:, :4], V[:, :4]) < bound**0.5


def test_power_iterations_sharpen_the_approximation():
    n, k = 150, 6
    evals = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0  # slow decay
    H = _psd(evals, seed=6)
    errors = []
    for q in range(3):
        _, lam = nystrom_eigenpairs(
            lambda V: H @ V, n, k, 5, q, torch.Generator().manual_seed(7)
        )
        errors.append(float(((evals[:k] - lam) / evals[:k]).max()))
    assert errors[0] > errors[1] > errors[2]


def test_zero_operator_and_bad_arguments():
    U, lam = nystrom_eigenpairs(lambda V: torch.zeros_like(V), 10, 3)
    assert lam.eq(0).all() and U.shape == (10, 3)
    with pytest.raises(ValueError, match="rank"):
        nystrom_eigenpairs(lambda V: V, 10, 11)
    with pytest.raises(ValueError, match="shape"):
        NystromSketch.gaussian(10, 4).add(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="width"):
        NystromSketch.gaussian(10, 11)


def test_dtype_follows_the_request():
    evals = torch.cat([torch.linspace(1, 2, 4, dtype=torch.float64), torch.zeros(16)])
    H = _psd(evals).float()
    U, lam = nystrom_eigenpairs(lambda V: H @ V, 20, 4, dtype=torch.float32)
    assert U.dtype == lam.dtype == torch.float32
    expected = evals[:4].flip(-1).float()
    torch.testing.assert_close(lam, expected, rtol=1e-5, atol=1e-5)
