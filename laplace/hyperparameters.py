"""The hyperparameters of a Laplace approximation as validated properties: prior
precision and mean, observation noise and temperature (a mixin of
:class:`~laplace.BaseLaplace`; the rules are in
:mod:`laplace.utils.hyperparameters`)."""

from __future__ import annotations

from typing import Any

import torch

from laplace.likelihoods import likelihood_model
from laplace.utils.enums import Likelihood
from laplace.utils.hyperparameters import (
    check_prior_mean,
    check_prior_precision,
    check_sigma_noise,
    check_temperature,
)

__all__ = ["HYPERPARAMETERS", "Hyperparameter", "HyperparametersMixin"]

#: The hyperparameters, in the order they are set (``sigma_noise`` is checked
#: against the likelihood, the prior against the treated parameters).
HYPERPARAMETERS = ("temperature", "sigma_noise", "prior_mean", "prior_precision")


class Hyperparameter:
    """A validated hyperparameter attribute of :class:`HyperparametersMixin`:
    kept as ``_<name>``; an assignment is checked by ``_check_hyperparameters``,
    which always returns a new tensor object (caches key on the identity of
    their inputs, see :mod:`laplace.utils.memo`)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.attribute = name, f"_{name}"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.attribute)

    def __set__(self, obj: Any, value: Any) -> None:
        checked = obj._check_hyperparameters(**{self.name: value})[self.name]
        setattr(obj, self.attribute, checked)


class HyperparametersMixin:
    """Validated ``sigma_noise``, ``prior_precision``, ``prior_mean`` and
    ``temperature``. The host class provides ``likelihood`` and
    ``_as_tensor(value)`` (the model's device and dtype)."""

    likelihood: Likelihood

    def _as_tensor(self, value: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prior_precision_lengths(self) -> dict[int, str] | None:
        """Allowed lengths of a 1-d prior precision and their meaning; ``None``
        while the treated parameters are not known (any length passes)."""
        return None

    def _prior_mean_lengths(self) -> dict[int, str] | None:
        """Allowed lengths of a 1-d prior mean (see ``_prior_precision_lengths``)."""
        return None

    def _check_hyperparameters(self, **values: Any) -> dict[str, Any]:
        """Validate hyperparameters without assigning them.

        Parameters
        ----------
        **values
            Any of ``sigma_noise``, ``prior_precision``, ``prior_mean``,
            ``temperature``.

        Returns
        -------
        dict
            The same keys: ``sigma_noise`` ``()``, ``prior_precision`` ``(n,)`` and
            ``prior_mean`` ``()`` or ``(n,)`` as tensors on the model's device in
            its (float32 for half precision) dtype, autograd graph kept;
            ``temperature`` a float.

        Raises
        ------
        ValueError
            Naming the hyperparameter, the value and what is allowed (see
            :mod:`laplace.utils.hyperparameters`).
        """
        owner = type(self).__name__
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name == "sigma_noise":
                tensor = check_sigma_noise(value)
                if not likelihood_model(self.likelihood).has_noise and (
                    float(tensor.detach()) != 1.0
                ):
                    raise ValueError(
                        f"sigma_noise={float(tensor.detach())} is only meaningful "
                        "for regression; it must be 1 for "
                        f"likelihood={self.likelihood.value!r}."
                    )
            elif name == "prior_precision":
                lengths = self._prior_precision_lengths()
                tensor = check_prior_precision(value, lengths, owner)
            elif name == "prior_mean":
                tensor = check_prior_mean(value, self._prior_mean_lengths(), owner)
                self._check_prior_mean_shape(tensor)
            elif name == "temperature":
                checked[name] = check_temperature(value)
                continue
            else:
                raise TypeError(f"Unknown hyperparameter {name!r}.")
            # a new tensor object (a view keeps the autograd graph): caches key
            # on the identity of their inputs
            checked[name] = self._as_tensor(tensor).view_as(tensor)
        return checked

    temperature = Hyperparameter("Likelihood temperature, a positive float.")
    sigma_noise = Hyperparameter("Observation noise standard deviation, ``()``.")
    prior_precision = Hyperparameter(
        "Prior precision: ``(1,)`` scalar, ``(n_layers,)`` or ``(n_params,)``."
    )
    prior_mean = Hyperparameter(
        "Prior mean: ``()`` for a scalar, else ``(1,)`` or ``(n_params,)``."
    )

    def _check_prior_mean_shape(self, prior_mean: torch.Tensor) -> None:
        """Hook for classes that restrict the prior mean further (e.g. to 0)."""
