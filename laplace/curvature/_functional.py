"""Per-sample evaluation of a module with ``torch.func``.

Curvature needs per-sample quantities (Jacobians, gradients, vector-Jacobian
products).  Vectorising a single-sample function with :func:`torch.func.vmap`
costs one pass per sample instead of one pass over the whole batch per sample,
which is what differentiating the batched output would cost.

Inputs are a tensor ``(batch, ...)`` or a dict-like batch whose tensor entries
share the leading batch dimension; each sample is handed to the module as a
batch of one, so modules written for batched input work unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, jacrev, vmap

from laplace.utils.data import batch_size

__all__ = [
    "batch_size",
    "flatten",
    "map_samples",
    "per_sample_gradients",
    "per_sample_jacobians",
    "per_sample_model",
    "selected_jacobians",
]

Params = dict[str, Tensor]
# A model input for one sample (or its batched payload for vmap).
Payload = Tensor | dict[str, Tensor]
SampleFn = Callable[[Params, Payload], Tensor]


def flatten(tree: Params, n_lead: int) -> Tensor:
    """Concatenate row-major flattened values after ``n_lead`` leading dims.

    ``{name: (*lead, *shape)}`` -> ``(*lead, P)`` in the dict's order.
    """
    return torch.cat([v.flatten(start_dim=n_lead) for v in tree.values()], dim=-1)


def per_sample_model(
    module: nn.Module, x: Tensor | MutableMapping, dict_key_x: str = "input_ids"
) -> tuple[SampleFn, Payload, Any]:
    """Split ``x`` for ``vmap`` and build the single-sample model function.

    Returns
    -------
    f1 : callable
        ``f1(params, x_n) -> (n_outputs,)``: ``module`` with ``params`` (partial
        dict; missing entries come from the module) on one sample.
    payload, in_dims
        Batched tensors to map over and their ``vmap`` ``in_dims``.
    """
    if isinstance(x, Tensor):

        def restore(x_n: Tensor) -> Tensor:
            return x_n.unsqueeze(0)

        payload, in_dims = x, 0
    elif isinstance(x, MutableMapping):
        n = batch_size(x, dict_key_x)
        payload = {
            k: v
            for k, v in x.items()
            if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n
        }
        in_dims = dict.fromkeys(payload, 0)

        def restore(x_n: dict[str, Tensor]) -> MutableMapping:
            # A shallow copy keeps the user's mapping type (UserDict, BatchEncoding).
            sample = dict(x) if type(x) is dict else copy.copy(x)
            for k, v in x_n.items():
                sample[k] = v.unsqueeze(0)
            return sample
    else:
        raise ValueError(
            f"Model input must be a Tensor or a dict-like batch, got {type(x).__name__}."
        )

    def f1(params: Params, x_n: Payload) -> Tensor:
        return functional_call(module, params, (restore(x_n),)).reshape(-1)

    return f1, payload, in_dims


def _select(arg: Any, dims: Any, n: int) -> Any:
    if dims is None:
        return arg
    if isinstance(dims, dict):
        return {k: v[n] for k, v in arg.items()}
    return arg[n]


def map_samples(fn: Callable, in_dims: tuple, *args: Any) -> Any:
    """``vmap(fn, in_dims)(*args)``, falling back to a loop over samples when the
    model cannot be vectorised (data-dependent control flow, e.g. Hugging Face
    attention-mask checks, or kernels without batching rules).

    Only ``in_dims`` entries ``None``, ``0`` or a dict of ``0`` are supported.
    """
    try:
        return vmap(fn, in_dims=in_dims, randomness="different")(*args)
    except RuntimeError as err:
        warnings.warn(
            f"torch.func.vmap failed on this model ({str(err).splitlines()[0]}); "
            "falling back to a slower loop over samples.",
            stacklevel=3,
        )
    batched = next(a for a, d in zip(args, in_dims) if d is not None)
    n_samples = len(
        next(iter(batched.values())) if isinstance(batched, dict) else batched
    )
    outs = [
        fn(*(_select(a, d, n) for a, d in zip(args, in_dims))) for n in range(n_samples)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def per_sample_jacobians(
    module: nn.Module,
    params: Params,
    x: Tensor | MutableMapping,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor]:
    """Jacobians of the outputs w.r.t. ``params``, one per sample.

    Returns
    -------
    Js : Tensor
        `(batch, n_outputs, P)`, columns in ``params`` order.
    f : Tensor
        Outputs `(batch, n_outputs)`.
    """
    f1, payload, in_dims = per_sample_model(module, x, dict_key_x)

    def jac_n(p: Params, x_n: Payload) -> tuple[Tensor, Tensor]:
        def out_twice(q: Params) -> tuple[Tensor, Tensor]:
            out = f1(q, x_n)
            return out, out

        jac, out = jacrev(out_twice, has_aux=True)(p)
        return flatten(jac, n_lead=1), out

    return map_samples(jac_n, (None, in_dims), params, payload)


def selected_jacobians(
    module: nn.Module,
    params: Params,
    x: Tensor | MutableMapping,
    index: Tensor,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor]:
    """Jacobians of the outputs ``index[n]`` of each sample w.r.t. ``params``.

    Parameters
    ----------
    index : LongTensor
        `(batch, selected)` output indices per sample.

    Returns
    -------
    Js : Tensor
        `(batch, selected, P)`, columns in ``params`` order.
    f : Tensor
        All outputs `(batch, n_outputs)`.
    """
    f1, payload, in_dims = per_sample_model(module, x, dict_key_x)

    def jac_n(p: Params, x_n: Payload, i_n: Tensor) -> tuple[Tensor, Tensor]:
        def picked(q: Params) -> tuple[Tensor, Tensor]:
            out = f1(q, x_n)
            return out[i_n], out

        jac, out = jacrev(picked, has_aux=True)(p)
        return flatten(jac, n_lead=1), out

    return map_samples(jac_n, (None, in_dims, 0), params, payload, index)


def per_sample_gradients(
    module: nn.Module,
    params: Params,
    x: Tensor | MutableMapping,
    y: Tensor,
    loss_n: Callable[[Tensor, Tensor], Tensor],
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor]:
    """Gradients of ``loss_n(f_n, y_n)`` w.r.t. ``params``, one per sample.

    Returns
    -------
    Gs : Tensor
        `(batch, P)`.
    losses : Tensor
        Per-sample losses `(batch,)`.
    """
    f1, payload, in_dims = per_sample_model(module, x, dict_key_x)

    def grad_n(p: Params, x_n: Payload, y_n: Tensor) -> tuple[Tensor, Tensor]:
        g, loss = grad_and_value(lambda q: loss_n(f1(q, x_n), y_n))(p)
        return flatten(g, n_lead=0), loss

    return map_samples(grad_n, (None, in_dims, 0), params, payload, y)
