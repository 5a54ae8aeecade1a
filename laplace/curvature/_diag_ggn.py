"""Matrix-free diagonal of the GGN ``sum_n J_n^T L_n L_n^T J_n``.

Per sample, one forward pass and one vector-Jacobian product per column of
``L_n`` (``torch.func.vjp`` vectorised over samples with ``vmap``) give the
squared columns ``(J_n^T L_n[:, c])**2``, accumulated over columns.  Peak memory
is `(batch, P)` per column instead of the `(batch, n_outputs, P)` Jacobians, and
the cost is `n_columns` backward passes over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

from torch import Tensor, nn
from torch.func import vjp

from laplace.curvature._functional import (
    Params,
    Payload,
    flatten,
    map_samples,
    per_sample_model,
)

__all__ = ["diag_ggn"]


def diag_ggn(
    module: nn.Module,
    params: Params,
    x: Tensor | MutableMapping,
    sqrt_fn: Callable[[Tensor], Tensor] | None = None,
    sqrt: Tensor | None = None,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor]:
    """Diagonal of the GGN of ``module`` w.r.t. ``params`` on the batch ``x``.

    Parameters
    ----------
    sqrt_fn : callable, optional
        Per-sample root ``f_n (n_outputs,) -> L_n (n_outputs, n_columns)``,
        evaluated on the outputs of the same forward pass.
    sqrt : Tensor, optional
        Precomputed roots `(batch, n_outputs, n_columns)`; exactly one of
        ``sqrt_fn`` and ``sqrt`` is given.

    Returns
    -------
    diag : Tensor
        `(P,)`, in ``params`` order.
    f : Tensor
        Outputs `(batch, n_outputs)`, detached.
    """
    if (sqrt_fn is None) == (sqrt is None):
        raise ValueError("diag_ggn: pass exactly one of `sqrt_fn` and `sqrt`.")
    f1, payload, in_dims = per_sample_model(module, x, dict_key_x)

    def squared_columns(
        p: Params, x_n: Payload, L_n: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        out, vjp_fn = vjp(lambda q: f1(q, x_n), p)
        out = out.detach()
        if L_n is None:
            L_n = sqrt_fn(out)
        acc = None
        for c in range(L_n.shape[-1]):
            (g,) = vjp_fn(L_n[:, c])
            sq = flatten(g, n_lead=0).square()
            acc = sq if acc is None else acc + sq
        return acc, out

    sq, f = map_samples(
        squared_columns,
        (None, in_dims, None if sqrt is None else 0),
        params,
        payload,
        sqrt,
    )
    return sq.sum(0), f
