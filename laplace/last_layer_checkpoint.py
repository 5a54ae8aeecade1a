"""Checkpoints of last-layer Laplace in laplace-torch 0.3's format: the state dict
also holds ``data``, the first training batch ``[X, y]``, and
``_last_layer_name``, the name given to the constructor (``None`` when the last
layer was found automatically); ours adds ``last_layer_name``, the layer used.
Loading into an object whose last layer is unknown sets it from the name or,
without one, finds it again by running the model on ``data``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from laplace.base import eval_mode
from laplace.checkpoint import (
    StateDictKeyError,
    detached_copy,
    inputs_entry,
    model_inputs_entry,
)
from laplace.utils.data import to_device

__all__ = ["LastLayerCheckpointMixin"]


class LastLayerCheckpointMixin:
    """Checkpoint hooks of :class:`~laplace.last_layer.LLLaplace` (see
    :class:`~laplace.parametric.checkpoint.ParametricCheckpointMixin`); the class
    provides ``_use_found_last_layer`` to rebuild its parameters once the last
    layer is set."""

    def _first_batch_state(self, batch: tuple[Any, torch.Tensor]) -> dict[str, Any]:
        return {"_first_batch": list(batch)}

    def _extra_state(self) -> dict[str, Any]:
        # laplace-torch's entries: the first training batch (to find the last
        # layer again) and the last_layer_name given to the constructor
        state = {"_last_layer_name": self._last_layer_name}
        if self._first_batch is not None:
            X, y = self._first_batch
            state["data"] = [X if isinstance(X, torch.Tensor) else dict(X), y]
        return {**state, "last_layer_name": self.model.last_layer_name}

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        # ours: the layer used; laplace-torch's: the one given (None: found)
        for key in ("last_layer_name", "_last_layer_name"):
            value = state_dict.get(key)
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"State dict entry {key!r} must be a str or None; got "
                    f"{type(value).__name__}."
                )
        name = state_dict.get("last_layer_name") or state_dict.get("_last_layer_name")
        if self.model.last_layer is not None:
            if name is not None and name != self.model.last_layer_name:
                raise ValueError(
                    f"State dict was fitted on last layer {name!r}, this Laplace uses "
                    f"{self.model.last_layer_name!r}."
                )
            return
        if name is not None:
            self.model.set_last_layer(name)
        elif "data" in state_dict:
            X, _ = _validated_batch(state_dict["data"], self._device)
            with torch.no_grad(), eval_mode(self.model), model_inputs_entry("data"):
                self.model.find_last_layer(X)
        else:
            raise StateDictKeyError(
                "State dict has neither 'last_layer_name' nor 'data' (the first "
                "training batch) to find the last layer with; pass last_layer_name "
                f"to {type(self).__name__}."
            )
        self._use_found_last_layer()

    def _validated_extra_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if "data" not in state_dict:
            return {"_first_batch": None}
        return {"_first_batch": _validated_batch(state_dict["data"], self._device)}


def _validated_batch(data: Any, device: torch.device) -> list:
    """``state_dict['data']``: a training batch ``[X, y]`` (``X`` a tensor or a
    dict of tensors), copied onto ``device``."""
    inputs = data[0] if isinstance(data, list | tuple) and len(data) == 2 else None
    if not (
        isinstance(inputs, torch.Tensor | Mapping) and isinstance(data[1], torch.Tensor)
    ):
        raise TypeError(
            "State dict entry 'data' must be the first training batch [X, y] with "
            f"tensors X (or a dict of them) and y; got {type(data).__name__}."
        )
    inputs_entry(inputs, "data")
    X, y = detached_copy(list(data))
    return [to_device(X, device), y.to(device)]
