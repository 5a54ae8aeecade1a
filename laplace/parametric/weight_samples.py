"""Weight samples of :class:`~laplace.ParametricLaplace` and the network run
under them (the ``nn`` predictive): drawn and evaluated in chunks of bounded
size, with numbers that do not depend on the chunking."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

from laplace.parametric.sampling import (
    affine_samples,
    outputs_under_weights,
    sample_chunk_rows,
)
from laplace.utils.data import batch_size
from laplace.utils.memory import check_memory

__all__ = ["WeightSamplesMixin"]

Inputs = torch.Tensor | MutableMapping


class WeightSamplesMixin:
    """``sample`` and the network outputs under weight samples, from the
    posterior's sample root (:meth:`~laplace.structures.Precision.sample_deviations`)
    and the selector's way to run the network (``sampled_forward``)."""

    #: Entries of weight samples (and, last-layer, of their outputs) that the ``nn``
    #: predictive holds at once; more samples are drawn and run in chunks.
    sample_chunk_elements: int = 2**20

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Weight samples from the posterior, ``(n_samples, n_params)``, in the
        model's dtype; ``n_samples=0`` gives ``(0, n_params)``. (A subnetwork's
        samples are full parameter vectors, the other entries at the MAP.)"""
        self._check_sampling_args(n_samples, generator, minimum=0)
        self._check_fitted()
        width = len(self.mean)
        if n_samples == 0:
            return self._to_output(self.mean.new_zeros(0, width))
        # the chunks and their concatenation
        self._check_sample_memory(n_samples, self.n_params + width)
        chunks = self._weight_sample_chunks(n_samples, generator)
        return self._to_output(torch.cat(list(chunks)))

    def _check_sample_memory(self, n_samples: int, values_per_sample: int) -> None:
        """Refuse ``sample(n_samples)`` up front when ``values_per_sample`` values
        per sample do not fit into the available memory."""
        check_memory(
            f"sample(n_samples={n_samples})",
            n_samples,
            values_per_sample * self.mean.element_size(),
            self._device,
            "samples",
            "Draw them in chunks: torch.cat([la.sample(m, generator=g) for _ in "
            "range(k)]) with m samples per call (a shared generator g keeps the "
            "draws independent).",
        )

    def _weight_sample_chunks(
        self,
        n_samples: int,
        generator: torch.Generator | None,
        max_rows: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """The rows of :meth:`sample` in chunks ``(rows, n_all)`` of at most
        ``sample_chunk_elements`` entries (and ``max_rows`` rows); the numbers do
        not depend on the chunking."""
        self._check_fitted()
        rows = max(1, self.sample_chunk_elements // self.n_params)
        sizes = sample_chunk_rows(n_samples, self.n_params, min(rows, max_rows or rows))
        if self._draws_noise_in_chunks():
            noise = (self._noise(size, generator) for size in sizes)
        else:
            noise = iter(self._noise(n_samples, generator).split(sizes))
        precision, mean = self._precision(), self._posterior_mean
        for eps in noise:
            # deviations are a fresh tensor: add the mean in place
            coords = precision.sample_deviations(eps).add_(mean)
            yield self._selector.full_vectors(coords, self.mean)

    def _draws_noise_in_chunks(self) -> bool:
        # CPU noise drawn chunk by chunk equals one draw (see sample_chunk_rows);
        # other devices' generators do not promise that: draw once, map in chunks
        return self._device.type == "cpu"

    def _noise(self, rows: int, generator: torch.Generator | None) -> torch.Tensor:
        """Standard-normal noise ``(rows, n_params)``."""
        return torch.randn(
            rows,
            self.n_params,
            device=self._device,
            dtype=self._dtype,
            generator=generator,
        )

    def _nn_chunks(
        self,
        x: Inputs,
        n_samples: int,
        generator: torch.Generator | None,
        model_kwargs: dict[str, Any],
    ) -> Iterator[torch.Tensor]:
        """Outputs ``(rows, batch, n_outputs)`` for consecutive chunks of weight
        samples: the network (or the part of it the selector names) runs once per
        sample with the samples in place of the treated parameters (restored
        afterwards, also on errors); a linear map of fixed features takes all
        samples of a chunk in one product."""
        forward = self._selector.sampled_forward(x, model_kwargs, self.enable_backprop)
        phi = forward.features
        n_rows = batch_size(x, self.dict_key_x)
        per_sample = self.n_params if phi is None else 4 * n_rows * self.n_outputs
        self._check_nn_memory(
            x, min(n_samples, max(1, self.sample_chunk_elements // per_sample))
        )
        rows = None
        if phi is not None:
            # also bound the chunk's outputs (rows, batch, n_outputs), of which a
            # few copies (product, softmax) live at once
            layer = forward.module
            per_row = 4 * (phi.numel() // phi.shape[-1]) * layer.out_features
            rows = max(1, self.sample_chunk_elements // per_row)
        for thetas in self._weight_sample_chunks(n_samples, generator, rows):
            values = self._unflatten_rows(thetas)
            if phi is None:
                yield outputs_under_weights(
                    forward.module, self.params, values, forward.run
                )
                continue
            layer = forward.module
            sampled = {id(p): v for p, v in zip(self.params, values)}
            weight = sampled.get(id(layer.weight), layer.weight)
            yield affine_samples(phi, weight, sampled.get(id(layer.bias), layer.bias))

    def _check_nn_memory(self, x: Inputs, rows: int) -> None:
        """Refuse the ``nn`` predictive up front when the outputs of ``rows``
        weight samples at once (and a few copies: softmax, averages) do not fit."""
        n_rows = batch_size(x, self.dict_key_x)
        check_memory(
            f"The nn predictive at {n_rows} inputs",
            rows,
            3 * n_rows * self.n_outputs * self.mean.element_size(),
            self._device,
            "weight samples",
            "Pass the inputs in chunks of fewer rows, or lower "
            "la.sample_chunk_elements (the weight samples run at once).",
        )

    def _unflatten_rows(self, thetas: torch.Tensor) -> list[torch.Tensor]:
        """Samples ``(n, n_all)`` as ``(n, *p.shape)`` per parameter ``p``, in
        the parameter's dtype (views where the dtype agrees)."""
        chunks = torch.split(thetas, self._layer_sizes, dim=-1)
        return [
            c.reshape(len(thetas), *p.shape).to(p.dtype)
            for c, p in zip(chunks, self.params)
        ]
