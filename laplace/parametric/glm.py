"""The linearised (GLM) predictive of weight-space Laplace approximations: the
Gaussian over the weights propagated through the network's Jacobian,
``f ~ N(f_MAP(x), J Sigma J^T)``. Where the posterior allows it, the variances
come without the ``(batch, n_outputs, n_params)`` Jacobian (per layer, or in
closed form for a linear last layer; see :mod:`laplace.parametric.fast_glm`)."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor

from laplace.parametric.fast_glm import (
    block_variance,
    dense_variance,
    per_layer_glm,
    readout_variance,
    row_chunks,
)
from laplace.parametric.weight_samples import WeightSamplesMixin
from laplace.utils.data import batch_size
from laplace.utils.empty import empty_predictive

__all__ = ["GLMPredictiveMixin"]

Inputs = Tensor | MutableMapping


class GLMPredictiveMixin(WeightSamplesMixin):
    """The GLM moments and Jacobian square forms of
    :class:`~laplace.ParametricLaplace` (and, inherited, its weight samples)."""

    #: Entries of Jacobians (or of per-layer output gradients) that a GLM
    #: predictive holds at once; larger inputs are processed in chunks of rows.
    glm_chunk_elements: int = 2**25

    def _moments(self, x: Inputs, joint: bool, diagonal: bool) -> tuple[Tensor, Tensor]:
        return self._glm_predictive_distribution(x, joint, diagonal)

    def _glm_predictive_distribution(
        self, x: Inputs, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mean ``(batch, K)`` and covariance of the linearised network, ``K`` the
        width of the network's output on ``x``.

        The mean is the network's output, ``model(x)`` in one forward pass, so
        every route (and ``joint``) gives the same numbers. Posteriors with a
        cheaper exact route than Jacobians use it (see :meth:`_glm_fast_route`);
        otherwise Jacobians are formed a chunk of rows at a time, at most
        ``glm_chunk_elements`` entries at once. A batch without rows gives
        moments without rows.
        """
        width = self._empty_width(x)
        if width is not None:
            return empty_predictive(width, self.mean, False, joint, diagonal_output)
        if joint:
            Js, f_mu = self._jacobians_and_output(x)
            return f_mu.flatten(), self.functional_covariance(Js)
        fast = self._glm_fast_route(x, diagonal_output)
        if fast is not None:
            return fast
        rows = max(1, self.glm_chunk_elements // (self.n_outputs * self.n_params))
        if rows >= batch_size(x, self.dict_key_x):
            Js, f_mu = self._jacobians_and_output(x)
            return f_mu, self._square_form(Js, diagonal_output)
        variances = [
            self._square_form(self._jacobians(xc)[0], diagonal_output)
            for xc in row_chunks(x, rows, self.dict_key_x)
        ]
        return self.model(x), torch.cat(variances)

    def _jacobians(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Jacobians ``(batch, K, P)`` of the treated parameters and the outputs
        of the Jacobian pass."""
        Js, f = self._selector.jacobians(
            self.backend, x, self.enable_backprop, self._make_backend
        )
        return Js.to(self._dtype), f

    def _jacobians_and_output(self, x: Inputs) -> tuple[Tensor, Tensor]:
        """Jacobians ``(batch, K, P)`` and the network output ``(batch, K)``:
        ``model(x)`` in one pass (the Jacobian routes evaluate the network per
        sample, which may round differently) unless the selector's pass gave it."""
        Js, f = self._jacobians(x)
        return Js, (f if self._selector.batched_outputs else self.model(x))

    def _glm_fast_route(
        self, x: Inputs, diagonal: bool
    ) -> tuple[Tensor, Tensor] | None:
        """Outputs and GLM variances without the ``(batch, n_outputs, n_params)``
        Jacobian of the backend, or ``None`` where no such route applies."""
        precision = self._precision()
        readout = self._selector.readout(x)
        if readout is not None:
            f, phi, layer = readout
            var = readout_variance(
                precision,
                self.params,
                layer,
                phi.to(self._dtype),
                self.n_outputs,
                diagonal,
                self.glm_chunk_elements,
            )
            return f, var
        if not self._selector.layer_factors:
            return None
        blocks = precision.layer_blocks(self.params)
        if blocks is not None:
            variance, extra = block_variance(blocks, self._dtype), 0
        elif precision.assembled_jacobians:
            # Jacobians from layer factors: cheaper than per-sample autograd
            variance = dense_variance(self._square_form, self.n_params, self._dtype)
            extra = self.n_params
        else:
            return None
        return per_layer_glm(
            self.model,
            self.params,
            variance,
            x,
            diagonal,
            keep_graph=self.enable_backprop,
            budget=self.glm_chunk_elements,
            dict_key_x=self.dict_key_x,
            per_output_extra=extra,
        )

    def _square_form(self, Js: Tensor, diagonal: bool) -> Tensor:
        if diagonal:
            return self._precision().square_form_diagonal(Js)
        return self.functional_variance(Js)

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J Sigma J^T`` per input: ``(batch, n_outputs, P)`` -> ``(batch, O, O)``."""
        return self._precision().square_form(Js)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint covariance of all outputs of all inputs, ``(B*O, B*O)``."""
        return self._precision().square_form(Js.reshape(1, -1, Js.shape[-1]))[0]
