"""Checks that a model computes what a Laplace approximation can use, run on the
first batch (and once before predicting with a posterior loaded from a state
dict), so that unusual models get a clear error instead of a crash deep inside
torch or a silently wrong posterior."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from laplace.utils.enums import Likelihood
from laplace.utils.feature_extractor import FeatureExtractor

__all__ = [
    "check_model_output",
    "check_last_layer_output",
    "check_extractor_output",
    "check_untied_last_layer",
]


def _check_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    raise TypeError(
        f"The model returned a {type(out).__name__}; a Laplace approximation needs "
        "model(x) to return one tensor of outputs of shape (batch, n_outputs). Wrap "
        "the model so that forward returns that tensor (e.g. out[0] of a tuple, "
        "out['logits'] of a dict); several inputs go in as one dict batch "
        "(dict_key_x)."
    )


def check_model_output(out: Any, likelihood: Likelihood) -> Tensor:
    """Return ``out`` if it is a ``(batch, n_outputs)`` tensor that fits the
    likelihood; else raise ``TypeError`` (not a tensor) or ``ValueError``."""
    out = _check_tensor(out)
    if out.ndim != 2:
        raise ValueError(
            f"The model output has shape {tuple(out.shape)}; a Laplace approximation "
            "needs outputs of shape (batch, n_outputs). Reduce extra dimensions in "
            "the model (e.g. out[:, -1] of a (batch, seq, n_outputs) output), or use "
            "subset_of_weights='last_layer' with feature_reduction."
        )
    from laplace.likelihoods import likelihood_model  # laplace.utils loads first

    likelihood_model(likelihood).check_outputs(out)
    return out


def check_last_layer_output(
    out: Any,
    features: Tensor,
    layer: nn.Module,
    layer_name: str,
    reduce: Callable[[Tensor], Tensor] | None,
    likelihood: Likelihood,
    calls: int = 1,
) -> Tensor:
    """Check that the model output ``out`` is ``layer(features)`` and return the
    latter, the output last-layer Laplace works with, ``(batch, n_outputs)``.

    Parameters
    ----------
    out : Tensor
        The model output; with ``reduce`` (a ``feature_reduction``) it may keep
        the sequence dimension, ``(batch, seq, n_outputs)``, and is reduced like
        the features.
    features : Tensor
        The (reduced) inputs of the last layer, ``(batch, D)``, or preference
        pairs ``(batch, 2, D)`` for reward modelling.
    calls : int
        How often ``layer`` ran in the forward pass.
    """
    out = _check_tensor(out)
    if calls != 1:
        raise ValueError(
            f"The last layer {layer_name!r} ran {calls} times in one forward pass; "
            "last-layer Laplace needs it applied once, to features that do not "
            "depend on its parameters. Pass the last_layer_name of a layer that "
            "runs once, or use subset_of_weights='all'."
        )
    from laplace.likelihoods import likelihood_model

    pairs = likelihood_model(likelihood).is_pair_batch(features)
    if features.ndim != 2 and not pairs:
        raise ValueError(
            f"The features entering the last layer {layer_name!r} have shape "
            f"{tuple(features.shape)}; last-layer Laplace needs (batch, n_features). "
            "Pass feature_reduction ('pick_first', 'pick_last' or 'average') to "
            "reduce (batch, seq, n_features) features."
        )
    with torch.no_grad():
        expected = layer(features)
    if pairs:
        expected = expected.squeeze(-1)
    compared = out
    if reduce is not None and out.ndim == expected.ndim + 1:
        compared = reduce(out)
    hint = (
        "Last-layer Laplace assumes the output is the last layer applied to the "
        "features; an operation after it (e.g. 3 * tanh(fc(h)), a softmax, a "
        "residual connection) would make the predictive variance silently wrong. "
        "Move such operations into a wrapper outside the model, pass the "
        "last_layer_name of the layer that produces the output, or use "
        "subset_of_weights='all'."
    )
    if compared.shape != expected.shape:
        raise ValueError(
            f"The model output has shape {tuple(out.shape)}, but its last layer "
            f"{layer_name!r} applied to the features gives "
            f"{tuple(expected.shape)}. {hint}"
        )
    compared, expected_ = compared.detach(), expected.detach()
    tol = torch.finfo(expected_.dtype).eps ** 0.5
    scale = max(1.0, float(expected_.abs().max())) if expected_.numel() else 1.0
    if not torch.allclose(compared, expected_, rtol=tol, atol=tol * scale):
        diff = float((compared - expected_).abs().max())
        raise ValueError(
            f"The model output is not its last layer {layer_name!r} applied to the "
            f"features (largest difference {diff:.3g}). {hint}"
        )
    return expected


def check_extractor_output(
    extractor: FeatureExtractor, out: Any, features: Tensor, likelihood: Likelihood
) -> Tensor:
    """:func:`check_last_layer_output` for the outputs and features of the latest
    forward pass of ``extractor``, then :func:`check_model_output`; returns the
    last layer's output ``(batch, n_outputs)``."""
    f = check_last_layer_output(
        out,
        features,
        extractor.last_layer,
        extractor.last_layer_name,
        extractor.reduce_like_features,
        likelihood,
        extractor.last_layer_calls,
    )
    return check_model_output(f, likelihood)


def check_untied_last_layer(
    model: nn.Module, layer: nn.Module, layer_name: str
) -> None:
    """Raise ``ValueError`` if a trainable parameter of ``layer`` also belongs to
    another module of ``model`` (tied weights): the features would then depend
    on the last layer's parameters. (The same module under a second name is
    fine unless it runs twice, which :func:`check_last_layer_output` catches.)"""
    own = {id(p): n for n, p in layer.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        if module is layer:
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in own:
                shared = f"{mod_name}.{p_name}" if mod_name else p_name
                raise ValueError(
                    f"The last layer's parameter {layer_name}.{own[id(p)]} is tied to "
                    f"{shared!r}: the features then depend on the last layer's "
                    "parameters, which last-layer Laplace keeps fixed, so its "
                    "posterior would be wrong. Untie the weights (e.g. assign "
                    "nn.Parameter(weight.detach().clone())) or use "
                    "subset_of_weights='all' with hessian_structure 'full' or 'diag'."
                )
