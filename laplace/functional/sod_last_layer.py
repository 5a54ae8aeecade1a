""":class:`FunctionalLaplace` over the last layer of a network."""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from laplace.approximation import eval_mode
from laplace.functional.base import Inputs
from laplace.functional.sod import FunctionalLaplace
from laplace.signatures import SUBSET_OF_DATA_LAST_LAYER, constructor
from laplace.utils.feature_extractor import FeatureExtractor, LastLayerRollbackMixin
from laplace.utils.model_checks import check_extractor_output, check_untied_last_layer

__all__ = ["FunctionalLLLaplace"]


class FunctionalLLLaplace(LastLayerRollbackMixin, FunctionalLaplace):
    """:class:`FunctionalLaplace` over the last layer only: the GP inputs are the
    penultimate features of a deep copy of ``model`` (wrapped in a
    :class:`~laplace.utils.feature_extractor.FeatureExtractor`).

    Parameters
    ----------
    feature_reduction : FeatureReduction or str, optional
        'pick_first', 'pick_last' or 'average' for ``(batch, seq, dim)`` features.
    last_layer_name : str, optional
        Found on the first batch of ``fit`` when ``None``.
    """

    _key = ("last_layer", "gp")
    _state_keys = ("subset_inputs", "last_layer_name")

    __init__ = constructor(SUBSET_OF_DATA_LAST_LAYER)

    def _setup(self, options: dict[str, Any]) -> None:
        model = options["model"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        extractor = FeatureExtractor(
            deepcopy(model),
            last_layer_name=options["last_layer_name"],
            enable_backprop=options["enable_backprop"],
            feature_reduction=options["feature_reduction"],
        )
        super()._setup({**options, "model": extractor})

    def _init_params(self) -> None:
        if self.model.last_layer is None:
            # found on the first batch of fit()
            self.params, self.mean, self.n_params, self.n_layers = [], None, None, 0
            return
        check_untied_last_layer(
            self.model.model, self.model.last_layer, self.model.last_layer_name
        )
        super()._init_params()

    def _treated_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.last_layer.parameters() if p.requires_grad]

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return {**super()._backend_init_kwargs(), "last_layer": True}

    def _before_fit(self, train_loader: Iterable) -> None:
        X, _ = next(self._batches(train_loader), (None, None))
        if X is None:
            raise ValueError("train_loader yielded no batches.")
        if self.model.last_layer is None:
            with torch.no_grad(), eval_mode(self.model):
                out, phi = self.model.find_last_layer_with_features(X)
            self._backend = None
            self._init_params()
            self._check_last_layer_outputs(out, phi)
        else:
            self._check_model_outputs(X)

    def _check_model_outputs(self, X: Inputs) -> int:
        with torch.no_grad(), eval_mode(self.model):
            out, phi = self.model.forward_with_features(X)
        return self._check_last_layer_outputs(out, phi)

    def _check_last_layer_outputs(self, out: Any, phi: torch.Tensor) -> int:
        f = check_extractor_output(self.model, out, phi, self.likelihood)
        self._outputs_checked = True
        return f.shape[-1]

    def _jacobians(
        self, x: Inputs, enable_backprop: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backprop = self.enable_backprop if enable_backprop is None else enable_backprop
        Js, f = self.backend.last_layer_jacobians(x, enable_backprop=backprop)
        return Js.to(self._dtype), f.to(self._dtype)

    def _jacobians_and_output(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        # the last-layer Jacobians come with the outputs of one forward pass
        return self._jacobians(x)

    def _own_state(self) -> dict[str, Any]:
        return {**super()._own_state(), "last_layer_name": self.model.last_layer_name}

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        name = state_dict["last_layer_name"]
        if not isinstance(name, str):
            raise TypeError(
                "State dict entry 'last_layer_name' must be a str; got "
                f"{type(name).__name__}."
            )
        if self.model.last_layer is None:
            self.model.set_last_layer(name)
            self._backend = None
            self._init_params()
        elif name != self.model.last_layer_name:
            raise ValueError(
                f"State dict was fitted on last layer {name!r}, this Laplace uses "
                f"{self.model.last_layer_name!r}."
            )
