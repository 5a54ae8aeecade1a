"""Checkpoints of the function-space Laplace approximations: on top of
:class:`~laplace.checkpoint.CheckpointMixin`, a state of another class,
likelihood, backend (class and keyword arguments), dict keys or model
(fingerprint of its parameters and buffers) is refused, unknown keys too, and
the model-dependent state (Jacobians of the kept inputs) is recomputed after
the entries are assigned, inside the same transaction."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from laplace.checkpoint import COMMON_KEYS, CheckpointMixin
from laplace.utils.configuration import same_configuration

__all__ = ["FunctionalCheckpointMixin"]


class FunctionalCheckpointMixin(CheckpointMixin):
    """The entries of :class:`~laplace.functional.BaseFunctionalLaplace`.
    Subclasses add theirs with ``_own_state`` (keys ``_state_keys``), check them
    in ``_check_own_state`` and restore them in ``_load_own_state``;
    ``_configuration`` holds the settings that must agree."""

    # class-specific entries of state_dict(), checked on load
    _state_keys: tuple[str, ...] = ()
    # constructor settings a state must agree with
    _settings: tuple[str, ...] = ()

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
            **{name: getattr(self, name) for name in self._settings},
        }

    def _own_entries(self, common: dict[str, Any]) -> dict[str, Any]:
        return {
            **self._configuration(),
            "model_fingerprint": self.model_fingerprint(),
            **common,
            **self._own_state(),
        }

    def _own_state(self) -> dict[str, Any]:
        """Class-specific entries of :meth:`state_dict` (keys ``_state_keys``)."""
        return {}

    def _required_keys(self) -> list[str]:
        expected = set(self._configuration()) | set(self._state_keys)
        expected |= {"model_fingerprint", "n_params", *COMMON_KEYS}
        return sorted(expected)

    def _check_saved_setting(self, state_dict: dict[str, Any]) -> None:
        unknown = sorted(set(state_dict) - set(self._required_keys()))
        if unknown:
            raise ValueError(
                f"Invalid state dict for {type(self).__name__}: unexpected keys "
                f"{unknown}."
            )
        for key, value in self._configuration().items():
            if not same_configuration(state_dict[key], value):
                raise ValueError(
                    f"State dict has {key}={state_dict[key]!r}, this "
                    f"{type(self).__name__} has {value!r}."
                )

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        if self._selector.prepare_load(state_dict, self._device):
            self._use_found_parameters()
        if state_dict["model_fingerprint"] != self.model_fingerprint():
            raise ValueError(
                "State dict was fitted on a model with other parameters or buffers "
                "(model fingerprint differs); load it into the model it was fitted on."
            )

    def _loaded_state(self, state_dict: dict[str, Any], like: Tensor) -> dict:
        self._check_own_state(state_dict)
        return {"mean": self._parameter_vector()}

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        # everything checked and assigned: recomputing Jacobians may still fail,
        # the transaction then restores the object
        self._load_own_state(state_dict)

    def _check_own_state(self, state_dict: dict[str, Any]) -> None:
        """Validate the class-specific entries (types, shapes, finite values)
        without assigning anything."""

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError
