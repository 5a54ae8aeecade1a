"""Randomized Nystrom approximation of a positive semi-definite operator that is
only seen through products, accumulated batch by batch.

For ``H = sum_b H_b`` (the curvature of a data set, one term per batch) and a
test matrix ``Omega`` ``(n, l)`` with orthonormal columns, the sketch
``Y = H Omega = sum_b H_b Omega`` is summed in one pass over the data with
``O(n l)`` memory, whatever the data size. The Nystrom approximation
``H ~ Y (Omega^T Y)^+ Y^T`` then gives ``l`` eigenpairs, of which the leading
``k`` are kept. Optional power (subspace) iterations ``Omega <- orth(H Omega)``
sharpen the leading eigenpairs at the cost of one more pass each.

The numerically stable variant follows Tropp, Yurtsever, Udell and Cevher (2017),
"Fixed-rank approximation of a positive-semidefinite matrix from streaming data",
Algorithm 3: a small shift ``nu`` keeps ``Omega^T Y`` positive definite and is
removed from the eigenvalues afterwards. The core is computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["NystromSketch", "nystrom_eigenpairs"]


def _orthonormal(M: Tensor) -> Tensor:
    return torch.linalg.qr(M, mode="reduced")[0]


class NystromSketch:
    """Sketch ``Y = H Omega`` of a PSD operator ``H`` ``(n, n)`` summed over terms.

    Parameters
    ----------
    test_matrix : Tensor
        ``Omega`` ``(n, l)`` with orthonormal columns (see :meth:`gaussian`).
    """

    def __init__(self, test_matrix: Tensor) -> None:
        if test_matrix.ndim != 2 or test_matrix.shape[1] > test_matrix.shape[0]:
            raise ValueError(
                "test_matrix must be (n, l) with l <= n; got shape "
                f"{tuple(test_matrix.shape)}."
            )
        self.test_matrix = test_matrix
        self.sketch = torch.zeros_like(test_matrix)

    @classmethod
    def gaussian(
        cls,
        n: int,
        width: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> NystromSketch:
        """A sketch with an orthonormalised Gaussian test matrix ``(n, width)``."""
        if not 1 <= width <= n:
            raise ValueError(f"width must lie in [1, n={n}]; got {width}.")
        omega = torch.randn(n, width, generator=generator, dtype=torch.float64)
        return cls(_orthonormal(omega).to(device=device, dtype=dtype))

    def add(self, product: Tensor) -> None:
        """Add one term's product ``H_b Omega`` ``(n, l)``."""
        if product.shape != self.sketch.shape:
            raise ValueError(
                f"product must have shape {tuple(self.sketch.shape)}; got "
                f"{tuple(product.shape)}."
            )
        self.sketch = self.sketch + product.to(self.sketch.dtype)

    def eigenpairs(self, rank: int) -> tuple[Tensor, Tensor]:
        """The ``rank`` leading eigenpairs of the Nystrom approximation:
        eigenvectors ``(n, rank)`` (orthonormal) and eigenvalues ``(rank,)``,
        descending and non-negative, in the sketch's dtype."""
        n, width = self.sketch.shape
        if not 1 <= rank <= width:
            raise ValueError(f"rank must lie in [1, {width}] (the sketch width).")
        Y = self.sketch.to(torch.float64)
        omega = self.test_matrix.to(torch.float64)
        scale = float(torch.linalg.matrix_norm(Y))
        if scale == 0.0:  # H Omega = 0: no curvature seen, any basis will do
            return self.test_matrix[:, :rank].clone(), self.sketch.new_zeros(rank)
        shift = n**0.5 * torch.finfo(torch.float64).eps * scale
        for _ in range(8):  # a larger shift if round-off breaks definiteness
            Y_shift = Y + shift * omega
            core = omega.T @ Y_shift
            L, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
            if not info:
                break
            shift *= 100
        else:
            raise ValueError("The sketched operator is not positive semi-definite.")
        # E = Y_shift L^{-T}: H_shift ~ E E^T
        E = torch.linalg.solve_triangular(L, Y_shift.T, upper=False).T
        U, S, _ = torch.linalg.svd(E, full_matrices=False)
        evals = (S.square() - shift).clamp_min(0.0)
        dtype = self.sketch.dtype
        return U[:, :rank].to(dtype), evals[:rank].to(dtype)


def nystrom_eigenpairs(
    apply: Callable[[Tensor], Tensor],
    n: int,
    rank: int,
    oversampling: int = 10,
    power_iterations: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Leading eigenpairs of a PSD operator ``H`` ``(n, n)`` from products.

    Parameters
    ----------
    apply : callable
        ``Omega (n, l) -> H Omega (n, l)``; each call is one pass over the data
        (the sum of the per-batch products).
    n, rank : int
        Size of ``H`` and number of eigenpairs, ``rank <= n``.
    oversampling : int, default=10
        Extra sketch columns beyond ``rank`` (capped at ``n``).
    power_iterations : int, default=0
        Subspace iterations before the sketch, one more call of ``apply`` each.

    Returns
    -------
    eigenvectors ``(n, rank)``, eigenvalues ``(rank,)``, descending.
    """
    if not 1 <= rank <= n:
        raise ValueError(f"rank must lie in [1, n={n}]; got {rank}.")
    if oversampling < 0 or power_iterations < 0:
        raise ValueError("oversampling and power_iterations must be >= 0.")
    width = min(n, rank + oversampling)
    sketch = NystromSketch.gaussian(n, width, generator, dtype, device)
    for _ in range(power_iterations):
        omega = _orthonormal(apply(sketch.test_matrix).to(torch.float64))
        sketch = NystromSketch(omega.to(device=device, dtype=dtype))
    sketch.add(apply(sketch.test_matrix))
    return sketch.eigenpairs(rank)
