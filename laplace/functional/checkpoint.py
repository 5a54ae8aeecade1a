"""Checkpoints of the function-space Laplace approximations: ``state_dict`` /
``load_state_dict`` that refuse a state of another class, likelihood, backend
(class and keyword arguments), dict keys or model (fingerprint of its
parameters and buffers), validate every entry before assigning anything and
leave the object unchanged when they fail."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from laplace.approximation import atomic
from laplace.checkpoint import (
    bool_entry,
    check_state_dict,
    detached_copy,
    integer_entry,
    loss_entry,
    validated_hyperparameters,
)
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
        """Everything needed to restore the fitted approximation, as copies
        (editing the dict never changes this object); only tensors, numbers,
        strings, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``."""
        self._check_fitted()
        return detached_copy(
            {
                **self._configuration(),
                "model_fingerprint": self.model_fingerprint(),
                "loss": torch.as_tensor(self.loss),
                "prior_mean": self.prior_mean,
                "prior_precision": self.prior_precision,
                "sigma_noise": self.sigma_noise,
                "temperature": float(self.temperature),
                "enable_backprop": bool(self.enable_backprop),
                "n_data": int(self.n_data),
                "n_outputs": int(self.n_outputs),
                "n_params": int(self.n_params),
                **self._own_state(),
            }
        )

    def _own_state(self) -> dict[str, Any]:
        """Class-specific entries of :meth:`state_dict` (keys ``_state_keys``)."""
        return {}

    @atomic
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`.

        Every entry is validated before anything is assigned, and a failing load
        leaves the object unchanged.

        Raises
        ------
        TypeError
            ``state_dict`` is not a dict, or an entry has the wrong type.
        StateDictKeyError
            Required keys are missing (a ``KeyError`` and a ``ValueError``).
        ValueError
            Another class, likelihood, backend (class and kwargs), dict keys or
            model; unexpected keys; entries of the wrong shape, NaN/Inf, invalid
            hyperparameters.
        """
        expected = set(self._configuration()) | set(self._state_keys)
        expected |= {"model_fingerprint", "loss", "prior_mean", "prior_precision"}
        expected |= {"sigma_noise", "temperature", "enable_backprop", "n_data"}
        expected |= {"n_outputs", "n_params"}
        check_state_dict(state_dict, type(self).__name__, sorted(expected))
        unknown = sorted(set(state_dict) - expected)
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
        self._prepare_load(state_dict)
        if state_dict["model_fingerprint"] != self.model_fingerprint():
            raise ValueError(
                "State dict was fitted on a model with other parameters or buffers "
                "(model fingerprint differs); load it into the model it was fitted on."
            )
        n_params = integer_entry(state_dict["n_params"], "n_params")
        if n_params != self.n_params:
            raise ValueError(
                f"State dict is over {n_params} parameters, this model treats "
                f"{self.n_params}."
            )
        like = self.prior_precision
        state = {
            "loss": loss_entry(state_dict["loss"], like),
            "n_data": integer_entry(state_dict["n_data"], "n_data", minimum=1),
            "n_outputs": integer_entry(state_dict["n_outputs"], "n_outputs", 1),
            "enable_backprop": bool_entry(
                state_dict["enable_backprop"], "enable_backprop"
            ),
            **validated_hyperparameters(self, state_dict),
        }
        self._check_own_state(state_dict)
        # everything checked: assign (recomputing Jacobians may still fail, the
        # transaction then restores the object)
        self._commit(state)
        self._refresh_mean()
        self._load_own_state(state_dict)

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        """Hook run before the model checks (e.g. to set the last layer); a
        failing load undoes it."""

    def _check_own_state(self, state_dict: dict[str, Any]) -> None:
        """Validate the class-specific entries (types, shapes, finite values)
        without assigning anything."""

    def _load_own_state(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError
