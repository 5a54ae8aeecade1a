"""Checkpoints of the weight-space Laplace approximations, in laplace-torch 0.3's
format: ``state_dict`` has the keys ``mean, H, loss, prior_mean,
prior_precision, sigma_noise, n_data, n_outputs, likelihood, temperature,
enable_backprop, cls_name`` (plus ``n_params`` and per-class entries), and
``load_state_dict`` accepts the state dicts laplace-torch 0.3 saves.

A load validates every entry against this model and structure before it
assigns anything, and a failing load leaves the object unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from laplace.approximation import atomic
from laplace.checkpoint import (
    bool_entry,
    check_state_dict,
    detached_copy,
    integer_entry,
    loss_entry,
    tensor_entry,
    validated_hyperparameters,
)

__all__ = ["ParametricCheckpointMixin", "REQUIRED_KEYS"]

#: Keys of every laplace-torch 0.3 (and our) parametric state dict.
REQUIRED_KEYS = (
    "mean",
    "H",
    "loss",
    "prior_mean",
    "prior_precision",
    "sigma_noise",
    "n_data",
    "n_outputs",
    "likelihood",
    "temperature",
    "enable_backprop",
    "cls_name",
)


class ParametricCheckpointMixin:
    """``state_dict``/``load_state_dict`` of
    :class:`~laplace.ParametricLaplace`: the structure saves and validates the
    curvature (``saved``/``loaded``), the selector its own entries (the last
    layer's names and first batch, subnetwork indices)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the fitted posterior, as copies (editing
        the dict never changes this object); only tensors, numbers, strings and
        lists, so it loads with ``torch.load(..., weights_only=True)``."""
        self._check_fitted()
        state = {
            "mean": self.mean,
            "H": self._structure.saved(self._H),
            "loss": torch.as_tensor(self.loss),
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "n_data": int(self.n_data),
            "n_outputs": int(self.n_outputs),
            "likelihood": self.likelihood.value,
            "temperature": float(self.temperature),
            "enable_backprop": bool(self.enable_backprop),
            "cls_name": type(self).__name__,
            "n_params": int(self.n_params),
            **self._selector.extra_state(self._first_batch),
        }
        return detached_copy(state)

    @atomic
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a posterior saved by :meth:`state_dict` of the same class
        (here or by laplace-torch 0.3) for the same model and likelihood.

        Raises
        ------
        TypeError
            ``state_dict`` is not a dict, or an entry has the wrong type.
        StateDictKeyError
            A required key is missing (a ``KeyError`` and a ``ValueError``).
        ValueError
            Another class or likelihood, an entry whose shape does not fit this
            model and structure, NaN/Inf values, or invalid hyperparameters.
            Nothing is changed then.
        """
        check_state_dict(state_dict, type(self).__name__, REQUIRED_KEYS)
        if state_dict["likelihood"] != self.likelihood.value:
            raise ValueError(
                f"State dict has likelihood={state_dict['likelihood']!r}, this "
                f"{type(self).__name__} has {self.likelihood.value!r}."
            )
        if self._selector.prepare_load(state_dict, self._device):
            self._use_found_parameters()
        self._commit(self._validated_state(state_dict))

    def _validated_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Attributes to assign, from ``state_dict`` checked against this model."""
        if "n_params" in state_dict:
            n_params = integer_entry(state_dict["n_params"], "n_params")
            if n_params != self.n_params:
                raise ValueError(
                    f"State dict holds a posterior over {n_params} parameters, this "
                    f"model has {self.n_params}: it comes from another model."
                )
        like = torch.empty(0, device=self._device, dtype=self._dtype)
        mean = tensor_entry(state_dict["mean"], "mean", like=like)
        n_mean = sum(self._layer_sizes)
        if tuple(mean.shape) != (n_mean,):
            raise ValueError(
                f"State dict entry 'mean' has shape {tuple(mean.shape)}, this model "
                f"has {n_mean} parameters: it comes from another model."
            )
        H = self._structure.loaded(state_dict["H"], self._layout, self.prior_precision)
        state = {
            "mean": mean,
            "loss": loss_entry(state_dict["loss"], like),
            "n_data": integer_entry(state_dict["n_data"], "n_data", minimum=1),
            "n_outputs": integer_entry(state_dict["n_outputs"], "n_outputs", 1),
            "enable_backprop": bool_entry(
                state_dict["enable_backprop"], "enable_backprop"
            ),
            **validated_hyperparameters(self, state_dict),
            "_first_batch": self._selector.loaded_first_batch(state_dict, self._device),
            "_H": H,
        }
        return state
