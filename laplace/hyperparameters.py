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

__all__ = ["HYPERPARAMETERS", "HyperparametersMixin"]

#: The hyperparameters, in the order they are set (``sigma_noise`` is checked
#: against the likelihood, the prior against the treated parameters).
HYPERPARAMETERS = ("temperature", "sigma_noise", "prior_mean", "prior_precision")


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
            checked[name] = self._as_tensor(tensor)
        return checked

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = self._check_hyperparameters(temperature=value)[
            "temperature"
        ]
        self._hyperparameters_changed()

    @property
    def sigma_noise(self) -> torch.Tensor:
        """Observation noise standard deviation, a 0-dim tensor."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        self._sigma_noise = self._check_hyperparameters(sigma_noise=value)[
            "sigma_noise"
        ]
        self._hyperparameters_changed()

    @property
    def prior_precision(self) -> torch.Tensor:
        """Prior precision: ``(1,)`` scalar, ``(n_layers,)`` or ``(n_params,)``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        self._prior_precision = self._check_hyperparameters(prior_precision=value)[
            "prior_precision"
        ]
        self._hyperparameters_changed()

    @property
    def prior_mean(self) -> torch.Tensor:
        """Prior mean: ``()`` for a scalar, else ``(1,)`` or ``(n_params,)``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | torch.Tensor) -> None:
        self._prior_mean = self._check_hyperparameters(prior_mean=value)["prior_mean"]
        self._hyperparameters_changed()

    def _check_prior_mean_shape(self, prior_mean: torch.Tensor) -> None:
        """Hook for classes that restrict the prior mean further (e.g. to 0)."""

    def _hyperparameters_changed(self) -> None:
        """Hook for subclasses that cache quantities depending on hyperparameters."""
