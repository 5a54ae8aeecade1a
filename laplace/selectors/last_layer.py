"""The last-layer selector: a posterior over the parameters of the last layer,
the rest of the network a fixed feature map.

The model is wrapped in a :class:`~laplace.utils.feature_extractor.FeatureExtractor`
around a deep copy, so the user's model is never touched. The last layer is
``last_layer_name`` or, when ``None``, found on the first batch of ``fit``; a
transaction that fails forgets a last layer found inside it.

Checkpoints follow laplace-torch 0.3: the state dict also holds ``data``, the
first training batch ``[X, y]``, and ``_last_layer_name``, the name given to
the constructor (``None`` when the layer was found); ours adds
``last_layer_name``, the layer used. Loading into an object whose last layer
is unknown sets it from the name or, without one, finds it again by running
the model on ``data``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor, nn

from laplace.checkpoint import (
    StateDictKeyError,
    detached_copy,
    inputs_entry,
    model_inputs_entry,
)
from laplace.likelihoods import likelihood_model
from laplace.selectors.selector import Inputs, ParameterSelector, SampledForward
from laplace.structures.protocol import Layout
from laplace.utils.data import to_device
from laplace.utils.eval_mode import eval_mode
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.model_checks import check_extractor_output, check_untied_last_layer

__all__ = ["LastLayer", "PairRewards"]


class PairRewards(nn.Module):
    """Rewards of both items of preference pairs as two logits: features
    ``(batch, 2, n_features)`` -> ``(batch, 2)``; shares the layer's parameters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, features: Tensor) -> Tensor:
        return self.layer(features).squeeze(-1)


class LastLayer(ParameterSelector):
    """``subset_of_weights='last_layer'`` (keywords ``last_layer_name`` and
    ``feature_reduction``; ``asdl_fisher_kwargs`` must be ``None``)."""

    subset = "last_layer"
    keeps_first_batch = True
    batched_outputs = True

    def __init__(self, options: dict[str, Any]) -> None:
        if options.get("asdl_fisher_kwargs") is not None:
            raise ValueError("asdl_fisher_kwargs must be None for last-layer Laplace.")
        super().__init__(options)
        self.model = FeatureExtractor(
            deepcopy(self.model),
            last_layer_name=options["last_layer_name"],
            enable_backprop=options["enable_backprop"],
            feature_reduction=options["feature_reduction"],
        )
        # as given (None: found on the first batch); saved as in laplace-torch
        self.given_name = options["last_layer_name"]
        self.likelihood = likelihood_model(options["likelihood"])
        self.enable_backprop = bool(options["enable_backprop"])
        self._last_pass: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def layer(self) -> nn.Module | None:
        return self.model.last_layer

    def layout(self) -> Layout | None:
        if self.layer is None:
            return None  # found on the first batch of fit()
        check_untied_last_layer(
            self.model.model, self.layer, self.model.last_layer_name
        )
        params = tuple(p for p in self.layer.parameters() if p.requires_grad)
        if not params:
            raise ValueError(
                "The model has no parameter with requires_grad=True to treat."
            )
        sizes = tuple(p.numel() for p in params)
        return Layout(params, sum(sizes), sizes)

    def backend_options(self) -> dict[str, Any]:
        return {"last_layer": True}

    # ---- fit: one forward pass per batch ------------------------------------------------
    # A forward pass gives outputs and features at once: fit needs the outputs of
    # the first batch (to find the last layer and the number of outputs) and the
    # features of every batch, so the first pass is kept for the next use.
    def find(self, X: Inputs) -> None:
        with torch.no_grad(), eval_mode(self.model):
            out, phi = self.model.find_last_layer_with_features(X)
        self._remember(X, out, phi)

    def forget_pass(self) -> None:
        self._last_pass = None

    @contextmanager
    def rollback(self) -> Iterator[None]:
        unknown = self.layer is None
        try:
            yield
        except BaseException:
            if unknown:
                self.model.forget_last_layer()
            raise

    def _remember(self, X: Inputs, out: Tensor, phi: Tensor) -> None:
        if isinstance(X, Tensor) and not self.enable_backprop:
            self._last_pass = (X, out, phi)

    def _recalled(self, X: Inputs) -> tuple[Tensor, Tensor] | None:
        kept = self._last_pass
        if kept is None or not isinstance(X, Tensor):
            return None
        Y = kept[0]
        same = Y is X or (
            Y.shape == X.shape
            and Y.dtype == X.dtype
            and Y.device == X.device
            and torch.equal(Y, X)
        )
        return kept[1:] if same else None

    def checked_outputs(self, X: Inputs, likelihood: Any) -> Tensor:
        recalled = self._recalled(X)
        if recalled is None:
            with torch.no_grad():
                recalled = self.model.forward_with_features(X)
            self._remember(X, *recalled)
        return check_extractor_output(self.model, *recalled, likelihood)

    def curvature_inputs(self, X: Inputs) -> Tensor:
        recalled = self._recalled(X)
        if recalled is not None:
            self._last_pass = None  # each batch's features are used once
            return recalled[1]
        # kept in the model's dtype: the last layer (and the backend) consume them
        with torch.set_grad_enabled(self.enable_backprop):
            return self.model.forward_with_features(X)[1]

    def curvature_backend(self, backend: Any, inputs: Tensor, make: Any) -> Any:
        if not self.likelihood.is_pair_batch(inputs):
            return backend
        # preference pairs (batch, 2, D): the curvature is that of a classifier
        # whose two logits are the rewards of the pair's items
        return make(PairRewards(self.layer), self.likelihood.pair_likelihood)

    # ---- predictions --------------------------------------------------------------------
    def jacobians(
        self, backend: Any, x: Inputs, enable_backprop: bool, make: Any
    ) -> tuple[Tensor, Tensor]:
        """Last-layer Jacobians and outputs of one forward pass over the batch
        (for features ``(batch, seq, D)`` reduced to ``(batch, D)``: the last
        layer applied to the reduced features)."""
        if self.likelihood.pairs:
            with torch.set_grad_enabled(enable_backprop):
                out, features = self.model.forward_with_features(x)
            if self.likelihood.is_pair_batch(features):
                # preference pairs: Jacobians of both logits
                pairs = make(PairRewards(self.layer), self.likelihood.pair_likelihood)
                Js, _ = pairs.jacobians(features, enable_backprop=enable_backprop)
                return Js, out
        return backend.last_layer_jacobians(x, enable_backprop=enable_backprop)

    def readout(self, x: Inputs) -> tuple[Tensor, Tensor, nn.Linear] | None:
        layer = self.layer
        if type(layer) is not nn.Linear:
            return None
        out, phi = self.model.forward_with_features(x)
        if phi.ndim != 2:
            return None
        return (out if out.ndim == 2 else layer(phi)), phi, layer

    def sampled_forward(
        self, x: Inputs, model_kwargs: dict[str, Any], enable_backprop: bool
    ) -> SampledForward:
        # the body runs once; the samples only go through the last layer
        with torch.set_grad_enabled(enable_backprop):
            phi = self.model.forward_with_features(x)[1]
        layer = self.layer
        linear = phi if type(layer) is nn.Linear else None
        return SampledForward(layer, lambda: layer(phi), linear)

    # ---- checkpoints --------------------------------------------------------------------
    def extra_state(self, first_batch: list | None) -> dict[str, Any]:
        state = {"_last_layer_name": self.given_name}
        if first_batch is not None:
            X, y = first_batch
            state["data"] = [X if isinstance(X, Tensor) else dict(X), y]
        return {**state, "last_layer_name": self.model.last_layer_name}

    def prepare_load(self, state_dict: dict[str, Any], device: Any) -> bool:
        # ours: the layer used; laplace-torch's: the one given (None: found)
        for key in ("last_layer_name", "_last_layer_name"):
            value = state_dict.get(key)
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"State dict entry {key!r} must be a str or None; got "
                    f"{type(value).__name__}."
                )
        name = state_dict.get("last_layer_name") or state_dict.get("_last_layer_name")
        if self.layer is not None:
            if name is not None and name != self.model.last_layer_name:
                raise ValueError(
                    f"State dict was fitted on last layer {name!r}, this Laplace uses "
                    f"{self.model.last_layer_name!r}."
                )
            return False
        if name is not None:
            self.model.set_last_layer(name)
        elif "data" in state_dict:
            X, _ = _validated_batch(state_dict["data"], device)
            with torch.no_grad(), eval_mode(self.model), model_inputs_entry("data"):
                self.model.find_last_layer(X)
        else:
            raise StateDictKeyError(
                "State dict has neither 'last_layer_name' nor 'data' (the first "
                "training batch) to find the last layer with; pass last_layer_name "
                "to the constructor."
            )
        return True

    def loaded_first_batch(self, state_dict: dict[str, Any], device: Any) -> Any:
        if "data" not in state_dict:
            return None
        return _validated_batch(state_dict["data"], device)


def _validated_batch(data: Any, device: torch.device) -> list:
    """``state_dict['data']``: a training batch ``[X, y]`` (``X`` a tensor or a
    dict of tensors), copied onto ``device``."""
    inputs = data[0] if isinstance(data, list | tuple) and len(data) == 2 else None
    if not (isinstance(inputs, Tensor | Mapping) and isinstance(data[1], Tensor)):
        raise TypeError(
            "State dict entry 'data' must be the first training batch [X, y] with "
            f"tensors X (or a dict of them) and y; got {type(data).__name__}."
        )
    inputs_entry(inputs, "data")
    X, y = detached_copy(list(data))
    return [to_device(X, device), y.to(device)]
