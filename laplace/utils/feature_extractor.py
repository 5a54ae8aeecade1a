"""Access to the penultimate features of a network for last-layer Laplace."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from laplace.utils.enums import FeatureReduction
from laplace.utils.errors import UnknownKeyError

__all__ = ["FeatureExtractor", "FeatureReduction"]


class FeatureExtractor(nn.Module):
    """Wrap ``model`` and expose the input of its last layer (the features).

    Hooks are registered only for the duration of a forward pass, so the wrapped
    model never carries leftover hooks and can be copied or pickled freely.

    Parameters
    ----------
    model : nn.Module
    last_layer_name : str, optional
        Name of the last layer in ``model.named_modules()``; found automatically on
        the first forward pass when ``None``.
    enable_backprop : bool, default=False
        Keep the features in the autograd graph (e.g. for gradients w.r.t. inputs).
    feature_reduction : FeatureReduction or str, optional
        How to reduce features of shape ``(batch, *middle, dim)`` (e.g. ``(batch,
        seq, dim)``) to ``(batch, dim)``: 'pick_first' (index 0 of every middle
        dim), 'pick_last' (index -1 of each) or 'average' (mean over all).
    """

    def __init__(
        self,
        model: nn.Module,
        last_layer_name: str | None = None,
        enable_backprop: bool = False,
        feature_reduction: FeatureReduction | str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.enable_backprop = enable_backprop
        self.feature_reduction = (
            None
            if feature_reduction is None
            else FeatureReduction.parse(feature_reduction, "feature_reduction")
        )
        self.last_layer: nn.Module | None = None
        self.last_layer_name: str | None = None
        #: How often the last layer ran in the latest forward pass with features.
        self.last_layer_calls = 0
        if last_layer_name is not None:
            self.set_last_layer(last_layer_name)

    def forward(self, x: torch.Tensor | MutableMapping) -> torch.Tensor:
        if self.last_layer is None:
            return self.find_last_layer(x)
        return self.model(x)

    def forward_with_features(
        self, x: torch.Tensor | MutableMapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the model output ``(batch, n_outputs)`` and the features
        ``(batch, n_features)`` that enter the last layer."""
        if self.last_layer is None:
            self.find_last_layer(x)
        captured: dict[str, torch.Tensor] = {}
        calls = [0]

        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured["features"] = inputs[0]
            calls[0] += 1

        handle = self.last_layer.register_forward_pre_hook(hook)
        try:
            out = self.model(x)
        finally:
            handle.remove()
        self.last_layer_calls = calls[0]
        if not calls[0]:
            raise ValueError(
                f"The last layer {self.last_layer_name!r} was not called in the "
                "forward pass; pass the last_layer_name of a layer the model uses."
            )
        features = captured["features"]
        if not self.enable_backprop:
            features = features.detach()
        return out, self._reduce(features)

    def reduce_like_features(self, values: torch.Tensor) -> torch.Tensor:
        """Reduce ``values`` ``(batch, seq, ...)`` over the sequence as the features
        are (e.g. a model output computed from unreduced features)."""
        return self._reduce(values)

    def _reduce(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, *middle, D)`` -> ``(B, D)`` over all middle dims:
        'pick_first' takes index 0 of each, 'pick_last' index -1 of each,
        'average' the mean over all of them."""
        if features.ndim <= 2 or self.feature_reduction is None:
            return features
        # row-major: index 0 (-1) of every middle dim is the first (last) row
        rows = features.reshape(features.shape[0], -1, features.shape[-1])
        if self.feature_reduction is FeatureReduction.PICK_FIRST:
            return rows[:, 0]
        if self.feature_reduction is FeatureReduction.PICK_LAST:
            return rows[:, -1]
        return rows.mean(dim=1)

    def set_last_layer(self, last_layer_name: str) -> None:
        """Use the module called ``last_layer_name`` as the last layer."""
        modules = dict(self.model.named_modules())
        if last_layer_name not in modules:
            raise UnknownKeyError(
                f"Invalid last_layer_name={last_layer_name!r}: no such module in the "
                f"model; available: {[n for n in modules if n][:20]}."
            )
        self.last_layer_name = last_layer_name
        self.last_layer = modules[last_layer_name]

    def forget_last_layer(self) -> None:
        """Make the last layer unknown again (undoes :meth:`set_last_layer` and
        :meth:`find_last_layer`, e.g. when the fit that found it failed)."""
        self.last_layer = None
        self.last_layer_name = None

    def find_last_layer(self, x: torch.Tensor | MutableMapping) -> torch.Tensor:
        """Run ``model(x)`` and take the last leaf module with parameters that was
        called as the last layer; return the model output."""
        return self.find_last_layer_with_features(x)[0]

    def find_last_layer_with_features(
        self, x: torch.Tensor | MutableMapping
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`find_last_layer`, but return the model output ``(batch,
        n_outputs)`` and the features ``(batch, n_features)`` of that same pass,
        as :meth:`forward_with_features` would."""
        called: list[str] = []
        last_input: list[Any] = [None]  # only the latest: activations are freed

        def record(name: str, inputs: tuple[Any, ...]) -> None:
            called.append(name)
            last_input[0] = inputs[0]

        handles = []
        for name, module in self.model.named_modules():
            if next(module.children(), None) is None and any(
                True for _ in module.parameters(recurse=False)
            ):
                handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, inputs, name=name: record(name, inputs)
                    )
                )
        try:
            with torch.set_grad_enabled(self.enable_backprop):
                out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        if not called:
            raise ValueError(
                "The model has no leaf module with parameters that could serve as the "
                "last layer; pass last_layer_name explicitly."
            )
        name, features = called[-1], last_input[0]
        self.set_last_layer(name)
        self.last_layer_calls = called.count(name)
        if not isinstance(self.last_layer, nn.Linear):
            raise ValueError(
                f"The automatically found last layer {name!r} is a "
                f"{type(self.last_layer).__name__}, but last-layer Laplace needs an "
                "nn.Linear; pass last_layer_name to choose it."
            )
        if not self.enable_backprop:
            features = features.detach()
        return out, self._reduce(features)
