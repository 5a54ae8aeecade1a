""":class:`FunctionalLaplace` over the last layer of a network."""

from __future__ import annotations

from typing import Any

from laplace.functional.sod import FunctionalLaplace
from laplace.selectors import LastLayer
from laplace.signatures import SUBSET_OF_DATA_LAST_LAYER, constructor

__all__ = ["FunctionalLLLaplace"]


class FunctionalLLLaplace(FunctionalLaplace):
    """:class:`FunctionalLaplace` over the last layer only: the GP inputs are the
    penultimate features of a deep copy of ``model`` (wrapped in a
    :class:`~laplace.utils.feature_extractor.FeatureExtractor`; see
    :class:`~laplace.selectors.LastLayer`).

    Parameters
    ----------
    feature_reduction : FeatureReduction or str, optional
        'pick_first', 'pick_last' or 'average' for ``(batch, seq, dim)`` features.
    last_layer_name : str, optional
        Found on the first batch of ``fit`` when ``None``.
    """

    _selector_type = LastLayer
    _state_keys = ("subset_inputs", "last_layer_name")

    __init__ = constructor(SUBSET_OF_DATA_LAST_LAYER)

    def _own_state(self) -> dict[str, Any]:
        return {**super()._own_state(), "last_layer_name": self.model.last_layer_name}

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        name = state_dict["last_layer_name"]
        if not isinstance(name, str):
            raise TypeError(
                "State dict entry 'last_layer_name' must be a str; got "
                f"{type(name).__name__}."
            )
        super()._prepare_load(state_dict)

    def _check_model_outputs(self, X: Any) -> int:
        n_outputs = super()._check_model_outputs(X)
        self._selector.forget_pass()  # the Jacobians come from their own pass
        return n_outputs
