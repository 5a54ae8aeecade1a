"""Checkpoints of the function-space Laplace approximations: ``state_dict`` /
``load_state_dict`` that refuse a state of another class, likelihood, backend
(class and keyword arguments), dict keys or model (fingerprint of its
parameters and buffers)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from laplace.utils.functional_utils import same_configuration

__all__ = ["FunctionalCheckpointMixin"]


class FunctionalCheckpointMixin:
    """``state_dict``/``load_state_dict`` of
    :class:`~laplace.functional.base.BaseFunctionalLaplace`. Subclasses add their
    entries with ``_own_state``/``_load_own_state`` and list their keys in
    ``_state_keys``; ``_configuration`` holds the settings that must agree."""

    # class-specific entries of state_dict(), checked on load
    _state_keys: tuple[str, ...] = ()

    def model_fingerprint(self) -> str:
        """SHA-256 over the names, shapes and values of the model's parameters and
        buffers: a checkpoint only loads into the model it was fitted on."""
        digest = hashlib.sha256()
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        for name, tensor in named:
            digest.update(f"{name}:{tuple(tensor.shape)}".encode())
            values = tensor.detach().to("cpu", torch.float64).contiguous()
            digest.update(values.numpy().tobytes())
        return digest.hexdigest()

    def _configuration(self) -> dict[str, Any]:
        backend_cls = self._backend_cls or self._default_backend()
        return {
            "cls_name": type(self).__name__,
            "likelihood": self.likelihood.value,
            "backend": f"{backend_cls.__module__}.{backend_cls.__qualname__}",
            "backend_kwargs": repr(sorted(self.backend_kwargs.items())),
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the fitted approximation; only tensors,
        numbers, strings, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``."""
        self._check_fitted()
        return {
            **self._configuration(),
            "model_fingerprint": self.model_fingerprint(),
            "loss": torch.as_tensor(self.loss).detach(),
            "prior_mean": self.prior_mean.detach(),
            "prior_precision": self.prior_precision.detach(),
            "sigma_noise": self.sigma_noise.detach(),
            "temperature": float(self.temperature),
            "enable_backprop": self.enable_backprop,
            "n_data": int(self.n_data),
            "n_outputs": int(self.n_outputs),
            "n_params": int(self.n_params),
            **self._own_state(),
        }

    def _own_state(self) -> dict[str, Any]:
        """Class-specific entries of :meth:`state_dict` (keys ``_state_keys``)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; refuses states of another
        class, likelihood, backend (class and kwargs), dict keys or model."""
        cls_name = state_dict.get("cls_name")
        if cls_name != type(self).__name__:
            raise ValueError(
                f"State dict has cls_name={cls_name!r}; cannot load it into "
                f"{type(self).__name__}."
            )
        expected = set(self._configuration()) | set(self._state_keys)
        expected |= {"model_fingerprint", "loss", "prior_mean", "prior_precision"}
        expected |= {"sigma_noise", "temperature", "enable_backprop", "n_data"}
        expected |= {"n_outputs", "n_params"}
        missing = sorted(expected - set(state_dict))
        unknown = sorted(set(state_dict) - expected)
        if missing or unknown:
            raise ValueError(
                f"Invalid state dict for {type(self).__name__}: missing keys "
                f"{missing}, unexpected keys {unknown}."
            )
        for key, value in self._configuration().items():
            if not same_configuration(state_dict[key], value):
                raise ValueError(
                    f"State dict has {key}={state_dict[key]!r}, this "
                    f"{type(self).__name__} has {value!r}."
                )
        self._prepare_load(state_dict)
        if state_dict["model_fingerprint"] != self.model_fingerprint():
            raise ValueError(
                "State dict was fitted on a model with other parameters or buffers "
                "(model fingerprint differs); load it into the model it was fitted on."
            )
        if state_dict["n_params"] != self.n_params:
            raise ValueError(
                f"State dict is over {state_dict['n_params']} parameters, this model "
                f"treats {self.n_params}."
            )
        self.loss = state_dict["loss"].to(self._device, self._dtype)
        self.n_data = int(state_dict["n_data"])
        self.n_outputs = int(state_dict["n_outputs"])
        self.temperature = state_dict["temperature"]
        self.enable_backprop = bool(state_dict["enable_backprop"])
        self.sigma_noise = state_dict["sigma_noise"]
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self._refresh_mean()
        self._load_own_state(state_dict)

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        """Hook run before the model checks (e.g. to set the last layer)."""

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError
