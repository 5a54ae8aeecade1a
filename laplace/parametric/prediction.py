"""Predictives of weight-space Laplace approximations: the linearised (GLM) one,
which propagates the Gaussian through the network's Jacobian, and the sampling
(``nn``) one, which runs the network with weight samples."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch.func import functional_call, vmap

from laplace.base import eval_mode
from laplace.parametric.fast_glm import (
    Block,
    block_variance,
    dense_variance,
    per_layer_glm,
    row_chunks,
)
from laplace.predictive import glm_link
from laplace.utils.enums import Likelihood, LinkApprox, PredType
from laplace.utils.utils import normal_samples

Inputs = torch.Tensor | MutableMapping
# weight samples per vectorised forward pass of the nn predictive
_MAX_SAMPLE_CHUNK = 32


class ParametricPredictionMixin:
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
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, int)
            or n_samples < 1
        ):
            raise ValueError(
                f"n_samples must be a positive integer; got {n_samples!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None; got {type(generator)}."
            )
        if joint and (
            pred_type is not PredType.GLM
            or self.likelihood is not Likelihood.REGRESSION
        ):
            raise ValueError(
                "joint=True is only available for pred_type='glm' and regression."
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
        observation noise ``sigma_noise**2`` is not included.
        """
        pred_type, link_approx = self._check_predict_args(
            pred_type, link_approx, n_samples, generator, joint
        )
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            if pred_type is PredType.NN:
                samples = self._nn_function_samples(
                    x, n_samples, generator, model_kwargs
                )
                if self._predicts_classes(fitting):
                    return torch.softmax(samples, dim=-1).mean(0)
                return samples.mean(0), samples.var(0)
            classification = self._predicts_classes(fitting)
            probit_only = classification and link_approx is LinkApprox.PROBIT
            f_mu, f_var = self._glm_predictive_distribution(
                x, joint=joint, diagonal_output=diagonal_output or probit_only
            )
            if not classification:
                return f_mu, f_var
            return glm_link(f_mu, f_var, link_approx, n_samples, generator)

    def _predicts_classes(self, fitting: bool) -> bool:
        """Class probabilities for classification, and for reward modelling on
        preference pairs when ``fitting=True``; (mean, variance) otherwise."""
        return self.likelihood is Likelihood.CLASSIFICATION or (
            fitting and self.likelihood is Likelihood.REWARD_MODELING
        )

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
        return to_device(x, self._device)

    def _glm_predictive_distribution(
        self, x: Inputs, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(batch, n_outputs)`` and covariance of the linearised network.

        Structures with a cheaper exact route than Jacobians use it (see
        :meth:`_glm_fast_route`); otherwise Jacobians are formed a chunk of rows
        at a time, at most ``glm_chunk_elements`` entries at once.
        """
        if joint:
            Js, f_mu = self._jacobians(x)
            return f_mu.flatten(), self.functional_covariance(Js)
        fast = self._glm_fast_route(x, diagonal_output)
        if fast is not None:
            return fast
        rows = max(1, self.glm_chunk_elements // (self.n_outputs * self.n_params))
        means, variances = [], []
        for xc in row_chunks(x, rows, self.dict_key_x):
            Js, f_mu = self._jacobians(xc)
            means.append(f_mu)
            variances.append(self._square_form(Js, diagonal_output))
        return torch.cat(means), torch.cat(variances)

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
            self.n_outputs,
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
        """Samples of the latent function at ``x``: ``(n_samples, batch, n_outputs)``."""
        pred_type, _ = self._check_predict_args(
            pred_type, LinkApprox.MC, n_samples, generator
        )
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            if pred_type is PredType.NN:
                return self._nn_function_samples(x, n_samples, generator, {})
            f_mu, f_var = self._glm_predictive_distribution(
                x, diagonal_output=diagonal_output
            )
            return normal_samples(f_mu, f_var, n_samples, generator)

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Like :meth:`functional_samples`, with the softmax applied for
        classification: ``(n_samples, batch, n_outputs)``."""
        samples = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator
        )
        if self.likelihood is Likelihood.CLASSIFICATION:
            return torch.softmax(samples, dim=-1)
        return samples

    # ---- weight samples --------------------------------------------------------------
    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Weight samples from the posterior, ``(n_samples, n_params)``."""
        self._check_fitted()
        eps = torch.randn(
            n_samples,
            self.n_params,
            device=self._device,
            dtype=self._dtype,
            generator=generator,
        )
        return self.mean + self._sample_deviations(eps)

    def _sample_deviations(self, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _nn_function_samples(
        self,
        x: Inputs,
        n_samples: int,
        generator: torch.Generator | None,
        model_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Network outputs under weight samples, ``(n_samples, batch, n_outputs)``.

        Several samples share one vectorised forward pass (``torch.func.vmap``);
        a model that cannot be vectorised runs one sample at a time.
        """
        samples = self.sample(n_samples, generator)
        names = self._treated_parameter_names()

        def forward(theta: torch.Tensor) -> torch.Tensor:
            params = dict(zip(names, self._unflatten(theta)))
            return self._forward_with(params, x, model_kwargs)

        # the activations of a chunk grow with the input: bound chunk * input
        size = x.numel() if isinstance(x, torch.Tensor) else self.glm_chunk_elements
        chunk = max(1, min(_MAX_SAMPLE_CHUNK, self.glm_chunk_elements // (8 * size)))
        try:
            return torch.cat([vmap(forward)(c) for c in samples.split(chunk)])
        except RuntimeError:
            return torch.stack([forward(theta) for theta in samples])

    def _treated_parameter_names(self) -> list[str]:
        ids = {id(p) for p in self.params}
        return [n for n, p in self.model.named_parameters() if id(p) in ids]

    def _unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        chunks = torch.split(theta, self._layer_sizes)
        return [c.view_as(p).to(p.dtype) for c, p in zip(chunks, self.params)]

    def _forward_with(
        self, params: dict[str, torch.Tensor], x: Inputs, model_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        # functional_call leaves the user's parameters untouched
        return functional_call(self.model, params, (x,), model_kwargs)
