"""Checkpoints of the weight-space Laplace approximations, in laplace-torch 0.3's
format: ``state_dict`` has the keys ``mean, H, loss, prior_mean,
prior_precision, sigma_noise, n_data, n_outputs, likelihood, temperature,
enable_backprop, cls_name`` (plus ``n_params`` and the selector's entries), and
``load_state_dict`` accepts the state dicts laplace-torch 0.3 saves. The
structure saves and validates ``H``, the selector its own entries (the last
layer's names and first batch, subnetwork indices); the rest is
:class:`~laplace.checkpoint.CheckpointMixin`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from laplace.checkpoint import COMMON_KEYS, CheckpointMixin, tensor_entry

__all__ = ["ParametricCheckpointMixin", "REQUIRED_KEYS"]

#: Keys of every laplace-torch 0.3 (and our) parametric state dict.
REQUIRED_KEYS = ("mean", "H", *COMMON_KEYS, "likelihood", "cls_name")


class ParametricCheckpointMixin(CheckpointMixin):
    """The entries of :class:`~laplace.ParametricLaplace`."""

    def _required_keys(self) -> list[str]:
        return list(REQUIRED_KEYS)

    def _own_entries(self, common: dict[str, Any]) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "H": self._structure.saved(self._H),
            **common,
            **self._selector.extra_state(self._first_batch),
        }

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        if self._selector.prepare_load(state_dict, self._device):
            self._use_found_parameters()

    def _loaded_state(self, state_dict: dict[str, Any], like: Tensor) -> dict:
        mean = tensor_entry(state_dict["mean"], "mean", like=like)
        n_mean = sum(self._layer_sizes)
        if tuple(mean.shape) != (n_mean,):
            raise ValueError(
                f"State dict entry 'mean' has shape {tuple(mean.shape)}, this model "
                f"has {n_mean} parameters: it comes from another model."
            )
        H = self._structure.loaded(state_dict["H"], self._layout, like)
        first_batch = self._selector.loaded_first_batch(state_dict, self._device)
        return {"mean": mean, "_H": H, "_first_batch": first_batch}
