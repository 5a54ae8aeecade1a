"""Parameter selectors: which parameters a posterior is over, and how the
Jacobians (or features) of the network with respect to them are obtained.

:class:`AllWeights` treats every parameter with ``requires_grad=True``;
:class:`~laplace.selectors.last_layer.LastLayer` those of the last layer, the
rest of the network a fixed feature map;
:class:`~laplace.selectors.subnetwork.Subnetwork` chosen entries of the
flattened parameter vector. A Laplace class holds one selector; the selector
holds the model the posterior works with.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from laplace.structures.protocol import Layout
from laplace.utils.model_checks import check_model_output
from laplace.utils.utils import trainable_parameters

__all__ = ["ParameterSelector", "AllWeights", "SampledForward"]

Inputs = Tensor | MutableMapping


@dataclass
class SampledForward:
    """How to run the network under weight samples (the ``nn`` predictive):
    ``run()`` with the treated parameters of ``module`` swapped for samples;
    ``features`` when the treated parameters are a linear map of fixed
    features (all samples then go through one product)."""

    module: nn.Module
    run: Any
    features: Tensor | None = None


class ParameterSelector:
    """Base class: the parameters of ``model`` with ``requires_grad=True``."""

    #: ``subset_of_weights`` of the ``Laplace`` factory
    subset: ClassVar[str]
    #: whether the GLM predictive may assemble Jacobians from per-layer factors
    #: of the whole network (see :mod:`laplace.parametric.fast_glm`)
    layer_factors: ClassVar[bool] = False
    #: whether ``state_dict`` keeps the first training batch (laplace-torch's
    #: last-layer checkpoints do)
    keeps_first_batch: ClassVar[bool] = False
    #: whether the outputs of :meth:`jacobians` are those of one forward pass
    #: over the batch (else the predictive mean is ``model(x)``, one pass)
    batched_outputs: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any]) -> None:
        """``options``: the bound constructor keywords."""
        model = options["model"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        self.model = model

    # ---- parameters -------------------------------------------------------------------
    def layout(self) -> Layout | None:
        """The treated parameters; ``None`` while they are not known."""
        params = tuple(trainable_parameters(self.model))
        if not params:
            raise ValueError(
                "The model has no parameter with requires_grad=True to treat."
            )
        sizes = tuple(p.numel() for p in params)
        return Layout(params, sum(sizes), sizes)

    def prior_lengths(self, layout: Layout, precision: bool) -> dict[int, str]:
        """Allowed lengths of a 1-d prior precision (``precision``) or mean."""
        if precision:
            return {
                1: "scalar",
                len(layout.groups): "one per layer",
                layout.n_params: "one per parameter",
            }
        return {1: "scalar", layout.n_params: "one per parameter"}

    def coordinates(self, theta: Tensor) -> Tensor:
        """The entries of parameter vectors ``(..., n_all)`` the Gaussian is over
        (vectors already of the Gaussian's size pass)."""
        return theta

    def full_vectors(self, coords: Tensor, mean: Tensor) -> Tensor:
        """Parameter vectors ``(n, n_all)`` from Gaussian samples ``(n, P)`` (the
        other entries at ``mean``)."""
        return coords

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments the backend needs for these parameters."""
        return {}

    # ---- fit --------------------------------------------------------------------------
    def find(self, X: Inputs) -> None:
        """Learn the treated parameters from a first batch (last layer)."""

    def forget_pass(self) -> None:
        """Drop a forward pass kept for reuse (see the last-layer selector)."""

    @contextmanager
    def rollback(self) -> Iterator[None]:
        """Undo what :meth:`find` learned when the block raises."""
        yield

    def checked_outputs(self, X: Inputs, likelihood: Any) -> Tensor:
        """The outputs the posterior linearises, checked against the
        likelihood (see :mod:`laplace.utils.model_checks`)."""
        with torch.no_grad():
            return check_model_output(self.model(X), likelihood)

    def curvature_inputs(self, X: Inputs) -> Any:
        """What the backend gets as inputs of a batch."""
        return X

    def curvature_backend(self, backend: Any, inputs: Any, make: Any) -> Any:
        """The backend for a batch of ``inputs`` (``make(module, likelihood)``
        builds another one of the configured class)."""
        return backend

    # ---- predictions ------------------------------------------------------------------
    def jacobians(
        self, backend: Any, x: Inputs, enable_backprop: bool, make: Any
    ) -> tuple[Tensor, Tensor]:
        """Jacobians ``(batch, O, P)`` and the network outputs ``(batch, O)`` of
        the Jacobian pass (see :attr:`batched_outputs`)."""
        return backend.jacobians(x, enable_backprop=enable_backprop)

    def readout(self, x: Inputs) -> tuple[Tensor, Tensor, nn.Linear] | None:
        """Outputs, features ``(batch, D)`` and the layer when the treated
        parameters are a linear map of fixed features (closed-form GLM)."""
        return None

    def sampled_forward(
        self, x: Inputs, model_kwargs: dict[str, Any], enable_backprop: bool
    ) -> SampledForward:
        return SampledForward(self.model, lambda: self.model(x, **model_kwargs))

    # ---- checkpoints ------------------------------------------------------------------
    def extra_state(self, first_batch: list | None) -> dict[str, Any]:
        """Entries of ``state_dict`` particular to this selector."""
        return {}

    def prepare_load(self, state_dict: dict[str, Any], device: Any) -> bool:
        """Check the selector's entries of ``state_dict`` (and learn the treated
        parameters from them); whether they changed."""
        return False

    def loaded_first_batch(self, state_dict: dict[str, Any], device: Any) -> Any:
        return None


class AllWeights(ParameterSelector):
    """``subset_of_weights='all'``: every parameter with ``requires_grad=True``."""

    subset = "all"
    layer_factors = True
