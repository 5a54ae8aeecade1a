"""Predictions of the function-space (GP) Laplace approximations: the GP
predictive with its link approximations, function samples and the validation
NLL. Outputs are in the model's dtype; computations run in ``_dtype``."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch

from laplace.approximation import eval_mode
from laplace.predictive import glm_link
from laplace.utils.data import batch_size, to_device
from laplace.utils.empty import empty_output_width, empty_predictive
from laplace.utils.enums import LinkApprox, PredType
from laplace.utils.functional_utils import draw_gaussian
from laplace.utils.memory import check_function_samples
from laplace.utils.utils import normal_samples

__all__ = ["FunctionalPredictionMixin"]

Inputs = torch.Tensor | MutableMapping


class FunctionalPredictionMixin:
    """Prediction methods of
    :class:`~laplace.functional.base.BaseFunctionalLaplace`; subclasses provide
    ``functional_variance``/``functional_covariance`` and ``_moments`` (or the
    Jacobians it uses)."""

    def _classifies(self, fitting: bool) -> bool:
        return self._likelihood_model.predicts_classes(fitting)

    def _check_pred_type(self, pred_type: Any) -> None:
        if PredType.parse(pred_type, "pred_type") is not PredType.GP:
            raise ValueError(
                f"{type(self).__name__} only supports pred_type='gp' (the GP "
                f"predictive of the linearised network); got {pred_type!r}."
            )

    def __call__(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GP,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """GP predictive at ``x``.

        Returns
        -------
        Classification (and reward modelling with ``fitting=True``): probabilities
        ``(batch, n_classes)``. Regression: the latent mean ``(batch, O)`` and
        covariance ``(batch, O, O)`` (``(batch, O)`` with ``diagonal_output``; with
        ``joint=True`` a mean ``(batch * O,)`` and covariance ``(batch * O,)*2``),
        without the observation noise. All in the model's dtype.
        """
        self._check_pred_type(pred_type)
        link_approx = LinkApprox.parse(link_approx, "link_approx")
        self._check_sampling_args(n_samples, generator)
        if model_kwargs:
            raise ValueError(
                f"{type(self).__name__} does not forward model keyword arguments; "
                f"got {sorted(model_kwargs)}."
            )
        classification = self._classifies(fitting)
        if joint and classification:
            raise ValueError("joint=True is only available for regression.")
        f_mu, f_var = self._predictive_moments(x, joint)
        if classification and len(f_mu) == 0:  # no rows: no probabilities
            return self._to_output(f_mu.new_zeros(0, f_mu.shape[-1]))
        if not classification:
            if diagonal_output and not joint:
                f_var = f_var.diagonal(dim1=-2, dim2=-1)
            return self._to_output((f_mu, f_var))
        return self._to_output(glm_link(f_mu, f_var, link_approx, n_samples, generator))

    def predictive(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GP,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Alias of ``__call__`` with the laplace-torch ``predictive`` signature."""
        return self(
            x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples
        )

    def predictive_moments(
        self, x: Inputs, *, joint: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mean ``(batch, O)`` and covariance ``(batch, O, O)`` at ``x``
        (no observation noise); ``joint=True``: ``(batch * O,)`` and
        ``(batch * O, batch * O)`` over all inputs and outputs. In the model's
        dtype."""
        return self._to_output(self._predictive_moments(x, joint))

    def _predictive_moments(
        self, x: Inputs, joint: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predictive_moments` in the computation dtype."""
        self._check_fitted()
        x = to_device(x, self._device)
        width = self._empty_width(x)
        if width is not None:
            return empty_predictive(width, self.mean, False, joint)
        self._check_outputs_once(x)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            return self._moments(x, joint)

    def _empty_width(self, x: Inputs) -> int | None:
        """The network's output width when ``x`` has no rows, else ``None``."""
        if batch_size(x, self.dict_key_x) > 0:
            return None
        with eval_mode(self.model):
            return empty_output_width(lambda: self.model(x), self.n_outputs)

    def _moments(self, x: Inputs, joint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        Js, f = self._jacobians_and_output(x)
        f = f.to(self._dtype)
        if joint:
            return f.flatten(), self.functional_covariance(Js)
        return f, self.functional_variance(Js)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """Posterior covariance of the outputs per input, ``(batch, O, O)``, for
        Jacobians ``Js`` ``(batch, O, P)``."""
        raise NotImplementedError

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """Joint posterior covariance of all outputs of all inputs,
        ``(batch * O, batch * O)``."""
        raise NotImplementedError

    def functional_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        joint: bool = False,
    ) -> torch.Tensor:
        """Samples of the latent function, ``(n_samples, batch, O)``; with
        ``joint=True`` correlated across inputs, with ``diagonal_output``
        independent across outputs.

        ``pred_type`` may be 'glm', 'nn' or 'gp' (laplace-torch's signature); the
        samples always come from the GP posterior. In the model's dtype."""
        return self._to_output(
            self._function_samples(
                x, pred_type, n_samples, diagonal_output, generator, joint
            )
        )

    def _function_samples(
        self,
        x: Inputs,
        pred_type: PredType | str,
        n_samples: int,
        diagonal_output: bool,
        generator: torch.Generator | None,
        joint: bool,
    ) -> torch.Tensor:
        """:meth:`functional_samples` in the computation dtype."""
        PredType.parse(pred_type, "pred_type")
        self._check_sampling_args(n_samples, generator)
        self._check_fitted()
        x = to_device(x, self._device)
        width = self._empty_width(x)
        if width is not None:
            return self.mean.new_zeros(n_samples, 0, width)
        n_rows = batch_size(x, self.dict_key_x)
        itemsize = self.mean.element_size()
        check_function_samples(
            n_samples, n_rows, self.n_outputs, itemsize, self._device
        )
        f_mu, f_var = self._predictive_moments(x, joint)
        if joint:
            if diagonal_output:
                f_var = torch.diag(f_var.diagonal())
            flat = draw_gaussian(f_mu, f_var, n_samples, generator)
            return flat.reshape(n_samples, -1, self._output_count(f_mu, x))
        if diagonal_output:
            f_var = f_var.diagonal(dim1=-2, dim2=-1)
        return normal_samples(f_mu, f_var, n_samples, generator)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Not available: a function-space posterior has no Gaussian over the
        weights to draw from; use :meth:`functional_samples`."""
        raise NotImplementedError(
            f"{type(self).__name__} is a posterior over functions, not weights: it "
            "has no weight samples; draw function values with functional_samples(x)."
        )

    def _output_count(self, flat_mean: torch.Tensor, x: Inputs) -> int:
        return len(flat_mean) // batch_size(x, self.dict_key_x)

    def predictive_samples(
        self,
        x: Inputs,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        joint: bool = False,
    ) -> torch.Tensor:
        """Like :meth:`functional_samples`, with the softmax applied for
        classification: ``(n_samples, batch, O)``, in the model's dtype."""
        samples = self._function_samples(
            x, pred_type, n_samples, diagonal_output, generator, joint
        )
        if self._classifies(fitting):
            samples = torch.softmax(samples, dim=-1)
        return self._to_output(samples)

    def _validation_nll(self, loader: Iterable) -> float:
        """Mean negative log predictive density on ``loader`` (probit link for
        classification; Gaussian with the noise variance added for regression)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for X, y in self._batches(loader):
                f_mu, f_var = self._predictive_moments(X, joint=False)
                nll = self._likelihood_model.predictive_nll(
                    f_mu, f_var, y, self.sigma_noise
                )
                total += float(nll)
                count += len(y)
        if count == 0:
            raise ValueError("val_loader yielded no data.")
        return total / count
