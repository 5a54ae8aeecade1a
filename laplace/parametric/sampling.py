"""Building blocks of the Monte Carlo (``pred_type="nn"``) predictive: chunk sizes
for weight samples, running a network under sampled weights, and Monte Carlo
averages that never hold all samples' outputs at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

#: Standard-normal noise is drawn in blocks of this many values on the CPU; a draw
#: split at multiples of it (and no piece smaller) yields the numbers of one draw.
RNG_BLOCK = 16


def sample_chunk_rows(n_samples: int, n_params: int, max_rows: int) -> list[int]:
    """Rows per chunk of an ``(n_samples, n_params)`` draw of noise.

    Every chunk but the last holds a multiple of :data:`RNG_BLOCK` values and none
    holds fewer (the last absorbs a short remainder), so drawing the chunks one
    after the other with ``torch.randn`` on the CPU gives the numbers of a single
    ``torch.randn(n_samples, n_params)`` call. Chunks have at most ``max_rows``
    rows unless that rule needs more.
    """
    step = RNG_BLOCK // math.gcd(n_params, RNG_BLOCK)
    rows = max(step, max_rows // step * step)
    sizes = [rows] * (n_samples // rows)
    rest = n_samples - sum(sizes)
    if rest:
        if sizes and rest * n_params < RNG_BLOCK:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    return sizes


def parameter_slots(
    root: nn.Module, params: Sequence[torch.Tensor]
) -> list[list[tuple[nn.Module, str]]]:
    """Every ``(module, name)`` under ``root`` that holds each of ``params``; a
    tied parameter has several."""
    index = {id(p): i for i, p in enumerate(params)}
    slots: list[list[tuple[nn.Module, str]]] = [[] for _ in params]
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is not None and id(p) in index:
                slots[index[id(p)]].append((module, name))
    missing = [i for i, s in enumerate(slots) if not s]
    if missing:
        raise ValueError(
            f"Parameters at positions {missing} of the posterior are not part of "
            f"the module {type(root).__name__}."
        )
    return slots


def outputs_under_weights(
    root: nn.Module,
    params: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    forward: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``forward()`` once per weight sample, ``(n, *output_shape)``.

    ``values[j]`` holds the ``n`` samples of ``params[j]``, ``(n, *params[j].shape)``.
    Each sample is put in place of the parameters for one call and the originals
    are restored afterwards, also when ``forward`` raises. The tensors themselves
    are swapped (not their ``.data``), so autograd sees the samples.
    """
    slots = parameter_slots(root, params)
    per_sample = [value.unbind(0) for value in values]
    outputs = None
    try:
        for i in range(len(values[0])):
            for where, value in zip(slots, per_sample):
                for module, name in where:
                    module._parameters[name] = value[i]
            out = forward()
            if outputs is None:
                # one buffer up front: small outputs kept between large, freed
                # activations would fragment the heap and hold memory
                outputs = out.new_empty((len(values[0]), *out.shape))
            outputs[i] = out
    finally:
        for where, param in zip(slots, params):
            for module, name in where:
                module._parameters[name] = param
    return outputs


def affine_samples(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``features @ weight_s^T + bias_s`` for all samples ``s`` at once.

    ``features`` ``(..., D)``; ``weight`` ``(n, O, D)`` or a fixed ``(O, D)``;
    ``bias`` ``(n, O)``, a fixed ``(O,)`` or ``None``; at least one of them holds
    samples. Returns ``(n, ..., O)``.
    """
    lead = features.shape[:-1]
    x = features.reshape(-1, features.shape[-1])
    if weight.ndim == 2:  # only the bias is sampled
        out = (x @ weight.mT).unsqueeze(0) + bias.unsqueeze(1)
        return out.reshape(len(bias), *lead, -1)
    n, O, D = weight.shape
    # one (n O, D) x (D, N) product instead of n small ones; the class dimension
    # stays outside the inputs' (see softmax_mean)
    W = weight.reshape(n * O, D)
    if bias is None:
        flat = W @ x.mT
    else:
        flat = torch.addmm(bias.expand(n, O).reshape(n * O, 1), W, x.mT)
    return flat.reshape(n, O, -1).transpose(1, 2).reshape(n, *lead, O)


def softmax_mean(chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean of the softmax over samples: chunks ``(n_i, ..., C)`` -> ``(..., C)``."""
    total, count = 0, 0
    for chunk in chunks:
        classes_first = chunk.movedim(-1, 1)
        if classes_first.is_contiguous() and not chunk.is_contiguous():
            # classes outside the inputs in memory: a softmax across them runs
            # vectorised over the inputs, much faster for few classes
            probs = torch.softmax(classes_first, dim=1).sum(0).movedim(0, -1)
        else:
            probs = torch.softmax(chunk, dim=-1).sum(0)
        total = total + probs
        count += len(chunk)
    return (total / count).contiguous()


def mean_and_variance(
    chunks: Iterable[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over samples: chunks ``(n_i, ...)`` -> two
    ``(...)``, equal to ``torch.cat(chunks).mean(0)`` and ``.var(0)``."""
    count, mean, m2 = 0, 0, 0
    for chunk in chunks:
        n = len(chunk)
        chunk_mean = chunk.mean(0)
        chunk_m2 = (chunk - chunk_mean).square().sum(0)
        # pairwise merge of sums of squares (Chan et al.): no cancellation
        delta = chunk_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta.square() * (count * n / total)
        count = total
    return mean.contiguous(), (m2 / (count - 1)).contiguous()
