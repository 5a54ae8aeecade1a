"""The NTK Gram matrices of the subset-of-data GP (laplace-torch's protected
extension points of ``FunctionalLaplace``): plain ``J J^T`` of Jacobians
``(b, C, P)``, without the prior variance. A subclass may override them to
change the kernel; :class:`~laplace.functional.sod.FunctionalLaplace` computes
every kernel through them."""

from __future__ import annotations

import torch

__all__ = ["NTKKernels"]


def _pairwise(J1: torch.Tensor, J2: torch.Tensor, independent: bool) -> torch.Tensor:
    """``J1[i, c] . J2[j, d]``: ``(b1, b2, C, C)``, or ``(b1, b2, C)`` (``c = d``)."""
    if independent:
        return torch.einsum("icp,jcp->ijc", J1, J2)
    b1, n_out, n_params = J1.shape
    gram = J1.reshape(-1, n_params) @ J2.reshape(-1, n_params).T
    return gram.reshape(b1, n_out, len(J2), n_out).transpose(1, 2)


class NTKKernels:
    """``_kernel_batch``, ``_kernel_star`` and ``_kernel_batch_star``; with
    ``independent_outputs`` only the output-diagonal entries are kept."""

    independent_outputs: bool

    def _kernel_batch(
        self, jacobians: torch.Tensor, batch: torch.Tensor
    ) -> torch.Tensor:
        """Kernel between two batches of training points, Jacobians ``(b1, C,
        P)`` and ``(b2, C, P)``: ``(b1 * C, b2 * C)`` with rows ``(i, c)``, or
        ``(b1, b2, C)`` with ``independent_outputs``."""
        if self.independent_outputs:
            return _pairwise(jacobians, batch, independent=True)
        n_params = jacobians.shape[-1]
        return jacobians.reshape(-1, n_params) @ batch.reshape(-1, n_params).T

    def _kernel_star(
        self, jacobians: torch.Tensor, joint: bool = False
    ) -> torch.Tensor:
        """Kernel of test points ``(b, C, P)`` with themselves: ``(b, C, C)`` per
        point, or ``(b, C)`` with ``independent_outputs``; ``joint=True``: between
        all pairs, ``(b, b, C, C)`` or ``(b, b, C)``."""
        if joint:
            # not through _kernel_batch_star: overriding one must not change both
            return _pairwise(jacobians, jacobians, self.independent_outputs)
        if self.independent_outputs:
            return jacobians.square().sum(-1)
        return jacobians @ jacobians.mT

    def _kernel_batch_star(
        self, jacobians: torch.Tensor, batch: torch.Tensor
    ) -> torch.Tensor:
        """Kernel between test points ``(b1, C, P)`` and training points ``(b2, C,
        P)``: ``(b1, b2, C, C)``, or ``(b1, b2, C)`` with ``independent_outputs``."""
        return _pairwise(jacobians, batch, self.independent_outputs)
