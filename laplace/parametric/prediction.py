"""Predictives of weight-space Laplace approximations: the linearised (GLM) one,
which propagates the Gaussian through the network's Jacobian, and the sampling
(``nn``) one, which runs the network with weight samples."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from laplace.base import eval_mode
from laplace.parametric.fast_glm import (
    Block,
    block_variance,
    dense_variance,
    per_layer_glm,
    row_chunks,
)
from laplace.parametric.sampling import (
    mean_and_variance,
    softmax_mean,
)
from laplace.parametric.weight_samples import WeightSamplesMixin
from laplace.predictive import glm_link
from laplace.utils.data import batch_size
from laplace.utils.empty import empty_output_width, empty_predictive
from laplace.utils.enums import LinkApprox, PredType
from laplace.utils.memory import check_function_samples
from laplace.utils.utils import normal_samples

Inputs = torch.Tensor | MutableMapping


class ParametricPredictionMixin(WeightSamplesMixin):
    """Prediction methods of :class:`~laplace.ParametricLaplace`."""

    #: Entries of Jacobians (or of per-layer output gradients) that a GLM
    #: predictive holds at once; larger inputs are processed in chunks of rows.
    glm_chunk_elements: int = 2**25

    # ---- argument checks ---------------------------------------------------------------
    def _check_predict_args(
        self,
        pred_type: Any,
        link_approx: Any,
        n_samples: Any,
        generator: Any,
        joint: bool = False,
        fitting: bool = False,
    ) -> tuple[PredType, LinkApprox]:
        pred_type = PredType.parse(pred_type, "pred_type")
        link_approx = LinkApprox.parse(link_approx, "link_approx")
        if pred_type is PredType.GP:
            raise ValueError(
                f"pred_type='gp' is only available for functional Laplace classes; "
                f"{type(self).__name__} supports 'glm' and 'nn'."
            )
        if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
            raise ValueError(
                f"pred_type='nn' needs link_approx='mc'; got {link_approx.value!r}."
            )
        self._check_sampling_args(n_samples, generator)
        if joint and (
            pred_type is not PredType.GLM
            or self._likelihood_model.predicts_classes(fitting)
        ):
            raise ValueError(
                "joint=True is only available for pred_type='glm' and predictions "
                "of means and variances (regression)."
            )
        self._check_fitted()
        return pred_type, link_approx

    # ---- public predictive API ----------------------------------------------------------
    def __call__(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Posterior predictive at ``x``.

        Returns
        -------
        Classification: probabilities ``(batch, n_classes)``. Regression: the latent
        mean ``(batch, n_outputs)`` and variance ``(batch, n_outputs, n_outputs)``
        (``(batch, n_outputs)`` with ``diagonal_output``; with ``joint=True`` a mean
        ``(batch * n_outputs,)`` and covariance ``(batch * n_outputs,)*2``). The
        observation noise ``sigma_noise**2`` is not included. All in the model's
        dtype.
        """
        pred_type, link_approx = self._check_predict_args(
            pred_type, link_approx, n_samples, generator, joint, fitting
        )
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            width = self._empty_width(x)
            if width is not None:
                empty = empty_predictive(
                    width,
                    self.mean,
                    self._predicts_classes(fitting),
                    joint,
                    diagonal_output or pred_type is PredType.NN,
                )
                return self._to_output(empty)
            if pred_type is PredType.NN:
                # Monte Carlo averages over chunks: all outputs are never held
                chunks = self._nn_output_chunks(x, n_samples, generator, model_kwargs)
                chunks = (chunk.to(self._dtype) for chunk in chunks)
                if self._predicts_classes(fitting):
                    return self._to_output(softmax_mean(chunks))
                return self._to_output(mean_and_variance(chunks))
            classification = self._predicts_classes(fitting)
            probit_only = classification and link_approx is LinkApprox.PROBIT
            f_mu, f_var = self._glm_predictive_distribution(
                x, joint=joint, diagonal_output=diagonal_output or probit_only
            )
            if not classification:
                return self._to_output((f_mu, f_var))
            probs = glm_link(
                f_mu.to(f_var.dtype), f_var, link_approx, n_samples, generator
            )
            return self._to_output(probs)

    def _empty_width(self, x: Inputs) -> int | None:
        """The network's output width when ``x`` has no rows, else ``None``."""
        if batch_size(x, self.dict_key_x) > 0:
            return None
        return empty_output_width(lambda: self._network_output(x), self.n_outputs)

    def _predicts_classes(self, fitting: bool) -> bool:
        """Class probabilities for classification, and for reward modelling on
        preference pairs when ``fitting=True``; (mean, variance) otherwise."""
        return self._likelihood_model.predicts_classes(fitting)

    def _to_device(self, x: Inputs) -> Inputs:
        """Move ``x`` to the model's device after checking what it is: a clear
        error here beats one from deep inside the model."""
        from laplace.utils.data import to_device

        if not isinstance(x, torch.Tensor | MutableMapping):
            raise TypeError(
                f"x must be a Tensor or a dict-like batch; got {type(x).__name__}."
            )
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            model_dtype = self.params[0].dtype
            if x.dtype != model_dtype:
                raise ValueError(
                    f"x has dtype {x.dtype} but the model's parameters are "
                    f"{model_dtype}; cast the inputs with x.to({model_dtype})."
                )
        x = to_device(x, self._device)
        self._check_outputs_once(x)
        return x

    def _glm_predictive_distribution(
        self, x: Inputs, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(batch, K)`` and covariance of the linearised network, ``K`` the
        width of the network's output on ``x``.

        The mean is the network's output, ``model(x)`` in one forward pass, so
        every route (and ``joint``) gives the same numbers. Structures with a
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
        return self._network_output(x), torch.cat(variances)

    def _network_output(self, x: Inputs) -> torch.Tensor:
        """``model(x)``: the predictive mean, in one forward pass over the batch."""
        return self.model(x)

    def _jacobians_and_output(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians ``(batch, K, P)`` and the network output ``(batch, K)`` of
        :meth:`_network_output` (the Jacobian routes evaluate the network per
        sample, which may round differently)."""
        Js, _ = self._jacobians(x)
        return Js, self._network_output(x)

    def _glm_fast_route(
        self, x: Inputs, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hook: outputs and GLM variances without the ``(batch, n_outputs,
        n_params)`` Jacobian, or ``None`` when the structure has no such route."""
        return None

    @property
    def _treats_all_weights(self) -> bool:
        # subnetwork and last-layer subclasses restrict the Jacobians themselves
        return self._key is not None and self._key[0] == "all"

    def _per_layer_glm(
        self, x: Inputs, blocks: list[Block] | None, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`~laplace.parametric.fast_glm.per_layer_glm` on this posterior:
        with ``blocks`` per parameter tensor, else with Jacobians assembled from
        the layer factors and :meth:`functional_variance`."""
        if blocks is not None:
            variance, extra = block_variance(blocks, self._dtype), 0
        else:
            variance = dense_variance(self._square_form, self.n_params, self._dtype)
            extra = self.n_params
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

    def _square_form(self, Js: torch.Tensor, diagonal: bool) -> torch.Tensor:
        if diagonal:
            return self._functional_variance_diag(Js)
        return self.functional_variance(Js)

    def _jacobians(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        Js, f = self.backend.jacobians(x, enable_backprop=self.enable_backprop)
        return Js.to(self._dtype), f

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """``J Sigma J^T`` per input: ``(batch, n_outputs, P)`` -> ``(batch, O, O)``."""
        return self._cov_square_form(Js)

    def _functional_variance_diag(self, Js: torch.Tensor) -> torch.Tensor:
        """Diagonal of :meth:`functional_variance`, ``(batch, n_outputs)``."""
        return torch.diagonal(self.functional_variance(Js), dim1=-2, dim2=-1)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """Joint covariance of all outputs of all inputs, ``(B*O, B*O)``."""
        return self._cov_square_form(Js.reshape(1, -1, Js.shape[-1]))[0]

    def _cov_square_form(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples of the latent function at ``x``: ``(n_samples, batch, n_outputs)``,
        in the model's dtype."""
        return self._to_output(
            self._function_samples(x, pred_type, n_samples, diagonal_output, generator)
        )

    def _function_samples(
        self,
        x: Inputs,
        pred_type: PredType | str,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """:meth:`functional_samples` in the computation dtype."""
        pred_type, _ = self._check_predict_args(
            pred_type, LinkApprox.MC, n_samples, generator
        )
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            width = self._empty_width(x)
            if width is not None:
                return self.mean.new_zeros(n_samples, 0, width)
            check_function_samples(
                n_samples,
                batch_size(x, self.dict_key_x),
                self.n_outputs,
                max(self.mean.element_size(), 4),
                self._device,
            )
            if pred_type is PredType.NN:
                samples = self._nn_function_samples(x, n_samples, generator, {})
                return samples.to(self._dtype)
            f_mu, f_var = self._glm_predictive_distribution(
                x, diagonal_output=diagonal_output
            )
            return normal_samples(f_mu.to(f_var.dtype), f_var, n_samples, generator)

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Like :meth:`functional_samples`, with the softmax applied for
        classification: ``(n_samples, batch, n_outputs)``, in the model's dtype."""
        samples = self._function_samples(
            x, pred_type, n_samples, diagonal_output, generator
        )
        if self._likelihood_model.predicts_classes():
            samples = torch.softmax(samples, dim=-1)
        return self._to_output(samples)
