"""Per-layer factors of the network Jacobian for ``nn.Linear`` and ``nn.Conv2d``.

A layer computes ``s_t = W a_t + b`` at every position ``t`` (one position for a
plain linear layer, the patches of a convolution, the tokens of a sequence), so
the Jacobian of output ``o`` of sample ``n`` is, with ``g[n, o, t] = d f_o / d s_t``,

- w.r.t. ``W``: ``sum_t outer(g[n, o, t], a[n, t])`` (``(out, in)``, row-major as
  ``W.flatten()``),
- w.r.t. ``b``: ``sum_t g[n, o, t]``.

One forward pass with hooks gives the inputs ``a``, backward passes from a chunk
of output seeds give ``g`` (one vmapped pass, or one pass per seed where torch
cannot batch the backward, e.g. of convolutions): ``(batch, n_outputs, T, out)``
per layer instead of the ``(batch, n_outputs, n_params)`` Jacobian.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerFactors",
    "layer_plan",
    "forward_with_factors",
    "output_gradients",
    "set_gradients",
    "iter_gradients",
    "layer_jacobian",
]


@dataclass
class LayerFactors:
    """Jacobian factors of one layer.

    Attributes
    ----------
    module : nn.Module
    weight, bias : int or None
        Positions of the layer's weight and bias among the treated parameters
        (``None``: not treated).
    a : Tensor
        Inputs ``(batch, T, in)`` (unfolded patches for a convolution).
    g : Tensor or None
        Output gradients ``(batch, n_outputs_chunk, T, out)``, set per chunk.
    """

    module: nn.Module
    weight: int | None
    bias: int | None
    a: Tensor | None = None
    s: Tensor | None = None
    g: Tensor | None = None
    calls: int = 0


def _supported(module: nn.Module) -> bool:
    # Exact types: a subclass may change what forward computes.
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and module.padding != "same"
        )
    return False


def layer_plan(model: nn.Module, params: list[Tensor]) -> list[LayerFactors] | None:
    """The layers owning ``params``; ``None`` unless every treated parameter is the
    weight or bias of exactly one supported layer."""
    index = {id(p): i for i, p in enumerate(params)}
    owned: set[int] = set()
    plan = []
    for module in model.modules():
        local = [p for _, p in module.named_parameters(recurse=False) if id(p) in index]
        if not local:
            continue
        if not _supported(module) or any(id(p) in owned for p in local):
            return None
        owned.update(id(p) for p in local)
        bias = module.bias
        plan.append(
            LayerFactors(
                module,
                index.get(id(module.weight)),
                None if bias is None else index.get(id(bias)),
            )
        )
    return plan if len(owned) == len(params) else None


def _layer_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """``(batch, T, in)`` inputs of a linear map ``s_t = W a_t``."""
    if isinstance(module, nn.Conv2d):
        return _patches(module, x).transpose(1, 2)
    return x.reshape(len(x), -1, x.shape[-1])


def _patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded patches ``(batch, C_in kh kw, T)`` of a convolution's input
    ``(batch, C_in, H, W)``, as ``F.unfold``, from a strided view of the padded
    input: several times faster than ``F.unfold`` on CPU."""
    padding = (0, 0) if module.padding == "valid" else module.padding
    if x.ndim != 4:
        return F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    h_out = (h - dh * (kh - 1) - 1) // sh + 1
    w_out = (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided(
        (n, c, kh, kw, h_out, w_out),
        (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw),
        x.storage_offset(),
    )
    return view.reshape(n, c * kh * kw, h_out * w_out)


def _position_major(module: nn.Module, grad: Tensor) -> Tensor:
    """``(chunk, batch, *s.shape[1:])`` -> ``(batch, chunk, T, out)``."""
    k, n = grad.shape[:2]
    if isinstance(module, nn.Conv2d):
        grad = grad.reshape(k, n, grad.shape[2], -1).transpose(2, 3)
    else:
        grad = grad.reshape(k, n, -1, grad.shape[-1])
    return grad.transpose(0, 1)


def forward_with_factors(
    model: nn.Module,
    plan: list[LayerFactors],
    x: Tensor | MutableMapping,
    n_rows: int,
    keep_graph: bool,
) -> Tensor | None:
    """Run ``model(x)`` and record every layer's inputs ``a`` and outputs.

    Returns the outputs ``(batch, n_outputs)``, or ``None`` when a layer was not
    called exactly once on the batch (weight sharing, functional calls), so the
    factors would be wrong.
    """
    for layer in plan:
        layer.a, layer.s, layer.g, layer.calls = None, None, None, 0

    def hook(layer: LayerFactors):
        def record(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            layer.calls += 1
            inp = inputs[0] if keep_graph else inputs[0].detach()
            layer.a, layer.s = _layer_inputs(module, inp), output

        return record

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in plan]
    try:
        with torch.enable_grad():
            f = model(x)
    finally:
        for handle in handles:
            handle.remove()
    valid = all(
        layer.calls == 1 and layer.a.shape[0] == n_rows and layer.s.requires_grad
        for layer in plan
    )
    if not valid or f.ndim != 2 or f.shape[0] != n_rows:
        return None
    return f


def output_gradients(
    f: Tensor, plan: list[LayerFactors], chunk: int, keep_graph: bool
) -> Iterator[slice]:
    """For each chunk of outputs, set ``layer.g`` to ``(batch, chunk, T, out)`` and
    yield the chunk's slice of outputs."""
    n_rows, n_outputs = f.shape
    eye = torch.eye(n_outputs, device=f.device, dtype=f.dtype)
    for start in range(0, n_outputs, chunk):
        rows = slice(start, min(start + chunk, n_outputs))
        set_gradients(f, plan, eye[rows, None, :].expand(-1, n_rows, -1), keep_graph)
        yield rows


def set_gradients(
    f: Tensor, plan: list[LayerFactors], seeds: Tensor, keep_graph: bool
) -> None:
    """Set ``layer.g`` to the layer-output gradients ``(batch, k, T, out)`` of
    ``sum_n seeds[:, n] . f[n]`` for the ``k`` seeds ``(k, batch, n_outputs)``."""
    chunks = list(_seed_gradients(f, plan, seeds, keep_graph))
    grads = chunks[0] if len(chunks) == 1 else [torch.cat(g) for g in zip(*chunks)]
    for layer, grad in zip(plan, grads):
        layer.g = _position_major(layer.module, grad)


def iter_gradients(
    f: Tensor, plan: list[LayerFactors], seeds: Tensor, keep_graph: bool
) -> Iterator[None]:
    """Like :func:`set_gradients`, but set ``layer.g`` to the gradients of one
    chunk of seeds at a time (``(batch, k_chunk, T, out)``) and yield after each:
    for sums over the seeds without holding all gradients at once."""
    for grads in _seed_gradients(f, plan, seeds, keep_graph):
        for layer, grad in zip(plan, grads):
            layer.g = _position_major(layer.module, grad)
        yield


def _seed_gradients(
    f: Tensor, plan: list[LayerFactors], seeds: Tensor, keep_graph: bool
) -> Iterator[list[Tensor]]:
    """Vector-Jacobian products of ``f`` w.r.t. the layer outputs for the seeds
    ``(k, batch, n_outputs)``, in chunks ``(k_chunk, *s.shape)`` per layer: all
    seeds in one vmapped backward pass where that works, else one at a time."""
    outputs = [layer.s for layer in plan]
    kwargs = {
        "retain_graph": True,
        "create_graph": keep_graph,
        "allow_unused": True,
        "materialize_grads": True,
    }
    # torch has no batching rules for the backward of convolutions and pooling,
    # so vmap would loop over the seeds anyway, only slower than a plain loop
    if len(seeds) > 1 and not any(type(layer.module) is nn.Conv2d for layer in plan):
        try:
            grads = torch.autograd.grad(
                f, outputs, grad_outputs=seeds, is_grads_batched=True, **kwargs
            )
        except RuntimeError:
            pass  # an operation without a batching rule for its backward
        else:
            yield list(grads)
            return
    for seed in seeds:
        grads = torch.autograd.grad(f, outputs, grad_outputs=seed, **kwargs)
        yield [g.unsqueeze(0) for g in grads]


def layer_jacobian(
    plan: list[LayerFactors], n_params: int, dtype: torch.dtype
) -> Tensor:
    """The Jacobian ``(batch, k, n_params)`` for the current gradients ``g``
    ``(batch, k, T, out)``, columns in the order of the treated parameters."""
    cols: list[Tensor | None] = [None] * sum(
        (layer.weight is not None) + (layer.bias is not None) for layer in plan
    )
    for layer in plan:
        g = layer.g.to(dtype)
        if layer.weight is not None:
            J = torch.einsum("bctk,btl->bckl", g, layer.a.to(dtype))
            cols[layer.weight] = J.flatten(2)
        if layer.bias is not None:
            cols[layer.bias] = g.sum(2)
    J = torch.cat(cols, dim=-1)
    if J.shape[-1] != n_params:
        raise RuntimeError(f"Jacobian has {J.shape[-1]} columns, expected {n_params}.")
    return J
