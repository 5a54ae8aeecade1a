"""The predictive surface every Laplace class shares: ``la(x, ...)``,
``predictive``, ``functional_samples`` and ``predictive_samples`` with one
handling of their arguments, inputs, empty batches and outputs.

A class states the predictive types it offers and computes the latent moments
(:meth:`PredictiveMixin._moments`: the linearised network's Gaussian in weight
space, the GP posterior in function space); weight-space classes also run the
network under weight samples (``pred_type='nn'``). The likelihood object turns
moments into predictions (:meth:`laplace.likelihoods.LikelihoodModel.link`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from laplace.likelihoods import average_predictions
from laplace.utils.data import batch_size, to_device
from laplace.utils.empty import empty_output_width, empty_predictive
from laplace.utils.enums import LinkApprox, PredType
from laplace.utils.eval_mode import eval_mode
from laplace.utils.gaussian import draw_gaussian
from laplace.utils.memory import check_function_samples
from laplace.utils.utils import normal_samples

__all__ = ["PredictiveMixin", "predictive_alias", "predictive_call"]

Inputs = Tensor | MutableMapping


def predictive_call(default: PredType) -> Callable[..., Any]:
    """``__call__`` with laplace-torch's signature and ``pred_type`` defaulting
    to ``default`` (weight space 'glm', function space 'gp')."""

    def __call__(
        self: Any,
        x: Inputs,
        pred_type: PredType | str = default,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Posterior predictive at ``x``.

        Returns
        -------
        Classification (and reward modelling with ``fitting=True``): probabilities
        ``(batch, n_classes)``. Otherwise the latent mean ``(batch, n_outputs)``
        and covariance ``(batch, n_outputs, n_outputs)`` (``(batch, n_outputs)``
        with ``diagonal_output``; with ``joint=True`` a mean ``(batch *
        n_outputs,)`` and covariance ``(batch * n_outputs,)*2``), without the
        observation noise ``sigma_noise**2``. All in the model's dtype.
        """
        return self._predict(
            x,
            pred_type,
            joint,
            link_approx,
            n_samples,
            diagonal_output,
            generator,
            fitting,
            model_kwargs,
        )

    return __call__


def predictive_alias(default: PredType) -> Callable[..., Any]:
    """``predictive``: laplace-torch's alias of ``__call__``."""

    def predictive(
        self: Any,
        x: Inputs,
        pred_type: PredType | str = default,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Alias of ``__call__`` with the laplace-torch ``predictive`` signature."""
        return self(
            x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples
        )

    return predictive


class PredictiveMixin:
    """The prediction methods of :class:`~laplace.BaseLaplace`."""

    #: the ``pred_type`` values this class predicts with
    _pred_types: ClassVar[tuple[PredType, ...]] = (PredType.GLM, PredType.NN)

    __call__ = predictive_call(PredType.GLM)
    predictive = predictive_alias(PredType.GLM)

    # ---- hooks -------------------------------------------------------------------------
    def _moments(self, x: Inputs, joint: bool, diagonal: bool) -> tuple[Tensor, Tensor]:
        """Latent mean ``(batch, O)`` and covariance ``(batch, O, O)`` (or its
        diagonal ``(batch, O)`` when ``diagonal`` and cheaper) at ``x`` in the
        computation dtype; ``joint``: ``(batch * O,)`` and ``(batch * O,)*2``."""
        raise NotImplementedError

    def _nn_chunks(
        self, x: Inputs, n_samples: int, generator: Any, model_kwargs: dict
    ) -> Iterator[Tensor]:
        """Network outputs ``(rows, batch, O)`` under chunks of weight samples."""
        raise NotImplementedError

    def _check_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        """Hook: refuse model keyword arguments the class cannot forward."""

    # ---- arguments and inputs ------------------------------------------------------------
    def _check_pred_type(self, pred_type: Any) -> PredType:
        pred_type = PredType.parse(pred_type, "pred_type")
        if pred_type not in self._pred_types:
            allowed = " and ".join(repr(p.value) for p in self._pred_types)
            if PredType.GP in self._pred_types:
                raise ValueError(
                    f"{type(self).__name__} only supports pred_type='gp' (the GP "
                    f"predictive of the linearised network); got {pred_type.value!r}."
                )
            raise ValueError(
                f"pred_type={pred_type.value!r} is only available for functional "
                f"Laplace classes; {type(self).__name__} supports {allowed}."
            )
        return pred_type

    def _check_predict_args(
        self,
        pred_type: Any,
        link_approx: Any,
        n_samples: Any,
        generator: Any,
        joint: bool = False,
        fitting: bool = False,
    ) -> tuple[PredType, LinkApprox]:
        pred_type = self._check_pred_type(pred_type)
        link_approx = LinkApprox.parse(link_approx, "link_approx")
        if pred_type is PredType.NN and link_approx is not LinkApprox.MC:
            raise ValueError(
                f"pred_type='nn' needs link_approx='mc'; got {link_approx.value!r}."
            )
        self._check_sampling_args(n_samples, generator)
        if joint and (
            pred_type is PredType.NN or self._likelihood_model.predicts_classes(fitting)
        ):
            raise ValueError(
                "joint=True is only available for the linearised predictive of "
                "means and variances (regression), not for class probabilities "
                "or pred_type='nn'."
            )
        self._check_fitted()
        return pred_type, link_approx

    def _to_device(self, x: Inputs) -> Inputs:
        """Move ``x`` to the model's device after checking what it is: a clear
        error here beats one from deep inside the model."""
        if not isinstance(x, Tensor | MutableMapping):
            raise TypeError(
                f"x must be a Tensor or a dict-like batch; got {type(x).__name__}."
            )
        if isinstance(x, Tensor) and x.is_floating_point():
            model_dtype = self.params[0].dtype
            if x.dtype != model_dtype:
                raise ValueError(
                    f"x has dtype {x.dtype} but the model's parameters are "
                    f"{model_dtype}; cast the inputs with x.to({model_dtype})."
                )
        x = to_device(x, self._device)
        self._check_outputs_once(x)
        return x

    def _empty_width(self, x: Inputs) -> int | None:
        """The network's output width when ``x`` has no rows, else ``None``."""
        if batch_size(x, self.dict_key_x) > 0:
            return None
        with eval_mode(self.model):
            return empty_output_width(lambda: self.model(x), self.n_outputs)

    # ---- predictions ---------------------------------------------------------------------
    def _predict(
        self,
        x: Inputs,
        pred_type: Any,
        joint: bool,
        link_approx: Any,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
        fitting: bool,
        model_kwargs: dict[str, Any],
    ) -> Tensor | tuple[Tensor, Tensor]:
        pred_type, link_approx = self._check_predict_args(
            pred_type, link_approx, n_samples, generator, joint, fitting
        )
        self._check_model_kwargs(model_kwargs)
        lik = self._likelihood_model
        classes = lik.predicts_classes(fitting)
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            width = self._empty_width(x)
            if width is not None:
                empty = empty_predictive(
                    width,
                    self.mean,
                    classes,
                    joint,
                    diagonal_output or pred_type is PredType.NN,
                )
                return self._to_output(empty)
            if pred_type is PredType.NN:
                # Monte Carlo averages over chunks: all outputs are never held
                chunks = self._nn_chunks(x, n_samples, generator, model_kwargs)
                chunks = (chunk.to(self._dtype) for chunk in chunks)
                return self._to_output(average_predictions(lik, chunks, fitting))
            probit_only = classes and link_approx is LinkApprox.PROBIT
            f_mu, f_var = self._moments(x, joint, diagonal_output or probit_only)
            if not classes:
                if diagonal_output and not joint and f_var.ndim == 3:
                    f_var = f_var.diagonal(dim1=-2, dim2=-1)
                return self._to_output((f_mu, f_var))
            probs = lik.link(
                f_mu.to(f_var.dtype), f_var, link_approx, n_samples, generator
            )
            return self._to_output(probs)

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> Tensor:
        """Samples of the latent function at ``x``: ``(n_samples, batch, O)``,
        in the model's dtype; with ``joint=True`` correlated across inputs, with
        ``diagonal_output`` independent across outputs. (Function-space classes
        accept any ``pred_type`` and sample their GP.)"""
        return self._to_output(
            self._function_samples(
                x, pred_type, n_samples, diagonal_output, generator, joint
            )
        )

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        joint: bool = False,
    ) -> Tensor:
        """Like :meth:`functional_samples`, with the softmax applied where the
        predictions are class probabilities: ``(n_samples, batch, O)``."""
        samples = self._function_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint
        )
        if self._likelihood_model.predicts_classes(fitting):
            samples = torch.softmax(samples, dim=-1)
        return self._to_output(samples)

    def _sampling_pred_type(self, pred_type: Any) -> PredType:
        """The predictive function samples come from."""
        return self._check_pred_type(pred_type)

    def _function_samples(
        self,
        x: Inputs,
        pred_type: Any,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
        joint: bool,
    ) -> Tensor:
        """:meth:`functional_samples` in the computation dtype."""
        pred_type = self._sampling_pred_type(pred_type)
        self._check_sampling_args(n_samples, generator)
        if joint and pred_type is PredType.NN:
            raise ValueError("joint=True is not available for pred_type='nn'.")
        self._check_fitted()
        x = self._to_device(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            width = self._empty_width(x)
            if width is not None:
                return self.mean.new_zeros(n_samples, 0, width)
            n_rows = batch_size(x, self.dict_key_x)
            itemsize = max(self.mean.element_size(), 4)
            check_function_samples(
                n_samples, n_rows, self.n_outputs, itemsize, self._device
            )
            if pred_type is PredType.NN:
                chunks = self._nn_chunks(x, n_samples, generator, {})
                return torch.cat(list(chunks)).to(self._dtype)
            f_mu, f_var = self._moments(x, joint, diagonal_output and not joint)
            f_mu = f_mu.to(f_var.dtype)
            if joint:
                if diagonal_output:
                    f_var = torch.diag(f_var.diagonal())
                flat = draw_gaussian(f_mu, f_var, n_samples, generator)
                return flat.reshape(n_samples, n_rows, -1)
            if diagonal_output and f_var.ndim == 3:
                f_var = f_var.diagonal(dim1=-2, dim2=-1)
            return normal_samples(f_mu, f_var, n_samples, generator)
