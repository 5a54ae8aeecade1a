"""Nystrom features of the NTK for ELLA: a basis of parameter directions from
the Jacobians of a subsample, and the features ``J(x) V`` computed with
Jacobian-vector products."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from laplace.utils.linalg import symeig

__all__ = ["NYSTROM_OUTPUTS", "jvp_features", "nystrom_directions", "nystrom_rows"]

#: Values of ELLA's ``nystrom_outputs``.
NYSTROM_OUTPUTS = ("random", "all")
# directions pushed through one vmapped Jacobian-vector product
_DIRECTION_CHUNK = 64


def nystrom_rows(J: torch.Tensor, outputs: str, seed: int) -> torch.Tensor:
    """The Jacobian rows that span the basis, from the subsample's ``(M, O, P)``:
    one output per point drawn with ``seed`` ``(M, P)`` (``outputs='random'``),
    or all of them ``(M * O, P)`` (``'all'``)."""
    if outputs == "all":
        return J.reshape(-1, J.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randint(J.shape[1], (len(J),), generator=generator)
    return J[torch.arange(len(J)), picked.to(J.device)]


def nystrom_directions(rows: torch.Tensor, k: int) -> torch.Tensor:
    """``V = rows^T U diag(lambda)^{-1/2}`` ``(P, k)`` for the top-``k``
    eigenpairs of ``rows rows^T = U diag(lambda) U^T`` (fewer, with a warning,
    when fewer eigenvalues are numerically non-zero)."""
    eigvals, eigvecs = symeig(rows @ rows.T)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    tol = eigvals[0] * len(eigvals) * torch.finfo(eigvals.dtype).eps
    kept = min(k, int((eigvals > tol).sum()))
    if kept < k:
        warnings.warn(
            f"Only {kept} of n_eigenvalues={k} eigenvalues of the subsample's NTK "
            f"Gram matrix are numerically non-zero; using {kept}.",
            stacklevel=4,
        )
    return rows.T @ (eigvecs[:, :kept] / eigvals[:kept].sqrt())


def jvp_features(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    directions: torch.Tensor,
    x: torch.Tensor | dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``(batch, O)`` and features ``J(x) V`` ``(batch, O, k)`` for the
    directions ``V`` ``(P, k)`` over ``params`` (in their order), via
    Jacobian-vector products: no ``(batch, O, P)`` Jacobian."""
    primals = {n: p.detach() for n, p in params.items()}
    sizes = [p.numel() for p in primals.values()]

    def forward(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, values, (x,))

    def push(direction: torch.Tensor) -> torch.Tensor:
        chunks = direction.split(sizes)
        tangents = {
            n: c.view_as(p).to(p.dtype) for (n, p), c in zip(primals.items(), chunks)
        }
        return jvp(forward, (primals,), (tangents,))[1]

    pushed = [vmap(push)(chunk.T) for chunk in directions.split(_DIRECTION_CHUNK, 1)]
    return forward(primals), torch.cat(pushed).permute(1, 2, 0)
