"""Everything that depends on the likelihood, in one place: one object per
likelihood (BackPACK's one class per loss, laplax's loss module).

Each object owns

- the loss convention of the curvature backends: the *summed* loss
  ``loss_factor * loss_function(f, y)`` (regression ``0.5 * sum ||f - y||^2``,
  classification summed cross-entropy);
- the loss Hessian ``Lambda_n`` w.r.t. the outputs and its roots ``L_n L_n^T =
  Lambda_n`` (exact, in closed form, or Monte Carlo);
- target checks and reshaping, the output checks of the model;
- the log-likelihood of the training data, whether ``sigma_noise`` means
  anything, the training criterion of ``marglik_training``;
- what a prediction is (class probabilities through a link approximation, or
  mean and variance) and the default metric of a grid search.

No other module branches on the likelihood: code asks the object of its
:class:`~laplace.utils.enums.Likelihood` (:func:`likelihood_model`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from laplace.utils.enums import Likelihood, LinkApprox

__all__ = [
    "LikelihoodModel",
    "RegressionLikelihood",
    "ClassificationLikelihood",
    "RewardModelingLikelihood",
    "likelihood_model",
    "check_class_labels",
    "check_regression_targets",
]


def check_class_labels(y: Tensor, n_classes: int) -> Tensor:
    """Check class-index targets ``(batch,)`` with values in ``[0, n_classes)``."""
    if not isinstance(y, Tensor):
        raise ValueError(
            "Classification targets must be a 1-d integer tensor of class indices; "
            f"got {type(y).__name__}."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
        raise ValueError(
            "Classification targets must be a 1-d integer tensor of class indices; "
            f"got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"Classification targets must lie in [0, {n_classes}); got values in "
            f"[{int(y.min())}, {int(y.max())}]."
        )
    return y


def check_regression_targets(y: Tensor, n_outputs: int) -> Tensor:
    """Regression targets as ``(batch, n_outputs)``; ``(batch,)`` means one output
    and becomes ``(batch, 1)``. Never broadcast."""
    if not isinstance(y, Tensor):
        raise ValueError(
            f"Regression targets must be a float tensor of shape (batch, {n_outputs});"
            f" got {type(y).__name__}."
        )
    if y.ndim == 1 and n_outputs == 1:
        y = y.unsqueeze(-1)
    if y.ndim != 2 or y.shape[-1] != n_outputs or not y.is_floating_point():
        raise ValueError(
            f"Regression targets must be a float tensor of shape (batch, {n_outputs}) "
            f"to match the model output; got dtype {y.dtype} and shape "
            f"{tuple(y.shape)}."
        )
    return y


class LikelihoodModel:
    """What a likelihood means for a Laplace approximation (see the module
    docstring). Subclasses: :class:`RegressionLikelihood`,
    :class:`ClassificationLikelihood`, :class:`RewardModelingLikelihood`."""

    #: the enum member this object stands for
    kind: Likelihood
    #: ``loss = loss_factor * loss_function(f, y)``
    loss_factor: float
    #: whether ``sigma_noise`` is a free parameter (else it must be 1)
    has_noise: bool = False
    #: whether ``Lambda_n = I`` for every input (no root needed)
    identity_hessian: bool = False
    #: the loss name ASDL and BackPACK use for this likelihood
    loss_name: str
    #: whether targets are class indices (e.g. for class-balanced subsets)
    class_targets: bool = False
    #: whether the training data are preference pairs ``(batch, 2, ...)``
    pairs: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- loss and its Hessian ---------------------------------------------------------
    def loss_function(self, reduction: str = "sum") -> nn.Module:
        """The torch loss module (``reduction='mean'``: the training criterion)."""
        raise NotImplementedError

    def prepare_targets(self, y: Tensor) -> Tensor:
        """Targets in the shape the loss function expects (no checks)."""
        return y

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """The summed loss of the backends, ``()``, detached."""
        loss = self.loss_function()(f, self.prepare_targets(y))
        return (self.loss_factor * loss).detach()

    def hessian_parts(self, f: Tensor) -> tuple[Tensor, Tensor | None]:
        """``d (N, C)`` and ``v (N, C)`` (``None``: zero) with ``Lambda_n =
        diag(d_n) - v_n v_n^T`` the loss Hessian at the outputs ``f (N, C)``."""
        raise NotImplementedError

    def hessian_root(self, f: Tensor) -> Tensor:
        """Exact roots ``L (N, C, C)``, ``L_n L_n^T = Lambda_n``, of a batch of
        outputs ``f (N, C)``, in closed form."""
        d, v = self.hessian_parts(f)
        root = torch.diag_embed(d.sqrt())
        if v is None:
            return root
        # diag(d) - v v^T with v = d = p: L = diag(sqrt p) - p sqrt(p)^T
        return root - v.unsqueeze(-1) * d.sqrt().unsqueeze(-2)

    def sampled_root(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Monte Carlo root ``(N, C, num_samples)`` with ``E[L L^T] = Lambda``:
        gradients of the loss at labels drawn from the model."""
        raise NotImplementedError

    # ---- model outputs and targets ---------------------------------------------------
    def check_outputs(self, out: Tensor) -> None:
        """Raise ``ValueError`` when ``out (batch, C)`` cannot parametrise this
        likelihood."""

    def n_outputs(self, out: Tensor) -> int:
        """The number of outputs the posterior is over, from ``out (batch, C)``."""
        return int(out.shape[-1])

    def check_targets(self, y: Tensor, n_outputs: int) -> Tensor:
        """Check a batch of training or validation targets and return them in the
        shape the loss and the metrics expect; ``ValueError`` otherwise."""
        raise NotImplementedError

    def training_targets(self, y: Tensor, f: Tensor) -> Tensor:
        """Targets of a training step on outputs ``f`` (``marglik_training``), in
        the shape :meth:`loss_function` expects (soft class labels pass)."""
        return y

    def is_pair_batch(self, features: Tensor) -> bool:
        """Whether last-layer features ``(batch, 2, D)`` hold preference pairs."""
        return self.pairs and features.ndim == 3

    # ---- log-likelihood -----------------------------------------------------------------
    def log_likelihood(
        self,
        loss: Tensor,
        n_data: int,
        n_outputs: int,
        sigma_noise: Tensor,
        temperature: float,
    ) -> Tensor:
        """Tempered log-likelihood of the training data from the summed loss:
        ``-loss / (sigma^2 T) - N * n_outputs * log(sigma sqrt(2 pi))`` with a
        noise, else ``-loss / T``."""
        if not self.has_noise:
            return -loss / temperature
        factor = 1.0 / (sigma_noise.square() * temperature)
        normalizer = (
            n_data * n_outputs * torch.log(sigma_noise * math.sqrt(2 * math.pi))
        )
        return -factor * loss - normalizer

    def criterion_scale(self, sigma_noise: Tensor, temperature: float) -> Tensor:
        """``c`` with ``log p(D | theta) = -N c mean_loss + const`` for the mean
        training criterion (:meth:`loss_function` with ``reduction='mean'``)."""
        return torch.as_tensor(temperature, dtype=sigma_noise.dtype)

    # ---- predictions -------------------------------------------------------------------
    def predicts_classes(self, fitting: bool = False) -> bool:
        """Whether predictions are class probabilities (else mean and variance);
        ``fitting`` asks about the data the posterior was fitted on."""
        return False

    def scoring_kwargs(self) -> dict[str, Any]:
        """Keywords of ``la(x, ...)`` when a grid search scores predictions."""
        return {}

    def link(
        self,
        f_mu: Tensor,
        f_var: Tensor,
        link_approx: LinkApprox,
        n_samples: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Class probabilities ``(batch, C)`` of the latent Gaussian."""
        from laplace.predictive import glm_link

        return glm_link(f_mu, f_var, link_approx, n_samples, generator)

    def default_metric(self) -> Any:
        """The default loss of ``optimize_prior_precision(method='gridsearch')``."""
        from laplace.utils.metrics import RunningNLLMetric

        return RunningNLLMetric()

    def predictive_nll(
        self, f_mu: Tensor, f_var: Tensor, y: Tensor, sigma_noise: Tensor
    ) -> Tensor:
        """Summed negative log predictive density of targets ``y`` under the
        latent Gaussian ``f_mu (batch, C)``, ``f_var (batch, C, C)``: of the
        probit probabilities of the classes, ``()``."""
        from laplace.predictive import probit_probs

        probs = probit_probs(f_mu, f_var.diagonal(dim1=-2, dim2=-1))
        eps = torch.finfo(probs.dtype).tiny
        picked = probs.gather(-1, y.long().reshape(-1, 1)).clamp_min(eps)
        return -picked.log().sum()


class RegressionLikelihood(LikelihoodModel):
    """Gaussian likelihood with observation noise ``sigma_noise``; the backends'
    loss is ``0.5 * sum ||f - y||^2`` and ``Lambda_n = I``."""

    kind = Likelihood.REGRESSION
    loss_factor = 0.5
    has_noise = True
    identity_hessian = True
    loss_name = "mse"

    def loss_function(self, reduction: str = "sum") -> nn.Module:
        return nn.MSELoss(reduction=reduction)

    def prepare_targets(self, y: Tensor) -> Tensor:
        # (batch,) targets mean one output; MSELoss would broadcast them
        return y.unsqueeze(-1) if y.ndim == 1 else y

    def hessian_parts(self, f: Tensor) -> tuple[Tensor, None]:
        return torch.ones_like(f), None

    def hessian_root(self, f: Tensor) -> Tensor:
        n, C = f.shape
        return torch.eye(C, dtype=f.dtype, device=f.device).expand(n, C, C)

    def sampled_root(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        # gradients f - y~ with y~ ~ N(f, I) are standard normal
        shape = (f.shape[0], num_samples, f.shape[1])
        grads = torch.randn(shape, dtype=f.dtype, device=f.device, generator=generator)
        return grads.transpose(1, 2) / num_samples**0.5

    def check_targets(self, y: Tensor, n_outputs: int) -> Tensor:
        return check_regression_targets(y, n_outputs)

    def training_targets(self, y: Tensor, f: Tensor) -> Tensor:
        return check_regression_targets(y, f.shape[-1])

    def predictive_nll(
        self, f_mu: Tensor, f_var: Tensor, y: Tensor, sigma_noise: Tensor
    ) -> Tensor:
        """Of ``N(f_mu, diag(f_var) + sigma_noise^2)`` per output."""
        y = self.check_targets(y, f_mu.shape[-1]).to(f_mu.dtype)
        var = f_var.diagonal(dim1=-2, dim2=-1) + sigma_noise.square()
        return -torch.distributions.Normal(f_mu, var.sqrt()).log_prob(y).sum()

    def criterion_scale(self, sigma_noise: Tensor, temperature: float) -> Tensor:
        # mean squared error per point: log N(y; f, s^2) = -|f - y|^2 / (2 s^2) + c
        return temperature / (2 * sigma_noise.detach().square())

    def default_metric(self) -> Any:
        from laplace.utils.metrics import RunningMSEMetric

        return RunningMSEMetric()


class ClassificationLikelihood(LikelihoodModel):
    """Categorical likelihood of softmax outputs; the backends' loss is the
    summed cross-entropy and ``Lambda_n = diag(p_n) - p_n p_n^T``."""

    kind = Likelihood.CLASSIFICATION
    loss_factor = 1.0
    loss_name = "cross_entropy"
    class_targets = True

    def loss_function(self, reduction: str = "sum") -> nn.Module:
        return nn.CrossEntropyLoss(reduction=reduction)

    def hessian_parts(self, f: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.softmax(f, dim=-1)
        return p, p

    def sampled_root(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        f = f.detach()
        shape = (f.shape[0], num_samples, f.shape[1])
        kw = {"dtype": f.dtype, "device": f.device, "generator": generator}
        # Gumbel-max: argmax(log p + Gumbel noise) ~ Categorical(p)
        gumbel = -torch.log(-torch.log(torch.rand(shape, **kw)))
        logp = torch.log_softmax(f, dim=-1).unsqueeze(1)
        labels = (logp + gumbel).argmax(dim=-1)
        onehot = nn.functional.one_hot(labels, f.shape[1]).to(f.dtype)
        grads = torch.softmax(f, dim=-1).unsqueeze(1) - onehot
        return grads.transpose(1, 2) / num_samples**0.5

    def check_outputs(self, out: Tensor) -> None:
        if out.shape[-1] < 2:
            raise ValueError(
                f"likelihood='classification' needs one logit per class (at least 2 "
                f"outputs); the model has {out.shape[-1]}, for which every predicted "
                "probability would be 1. For a binary classifier with one logit z, "
                "return torch.cat([torch.zeros_like(z), z], dim=-1)."
            )

    def check_targets(self, y: Tensor, n_outputs: int) -> Tensor:
        return check_class_labels(y, n_outputs)

    def predicts_classes(self, fitting: bool = False) -> bool:
        return True


class RewardModelingLikelihood(ClassificationLikelihood):
    """Reward models (Bradley-Terry): fitted as a classifier of preference pairs
    ``(batch, 2, ...)`` whose two logits are the rewards of the pair's items,
    predicted as a regression of one reward per input."""

    kind = Likelihood.REWARD_MODELING
    pairs = True
    #: the pairs are fitted as a classifier of two logits
    pair_likelihood = Likelihood.CLASSIFICATION

    def check_outputs(self, out: Tensor) -> None:
        """One reward per item: nothing to check beyond the shape."""

    def n_outputs(self, out: Tensor) -> int:
        return 1  # one reward per item; a pair gives two logits

    def check_targets(self, y: Tensor, n_outputs: int) -> Tensor:
        return check_class_labels(y, 2)  # which item of the pair is preferred

    def predicts_classes(self, fitting: bool = False) -> bool:
        return fitting

    def scoring_kwargs(self) -> dict[str, Any]:
        # scored as a classifier of its preference pairs, as laplace-torch does
        return {"fitting": True}


_MODELS: dict[Likelihood, LikelihoodModel] = {
    model.kind: model
    for model in (
        RegressionLikelihood(),
        ClassificationLikelihood(),
        RewardModelingLikelihood(),
    )
}


def likelihood_model(likelihood: Likelihood | str | LikelihoodModel) -> LikelihoodModel:
    """The object of ``likelihood`` ('regression', 'classification' or
    'reward_modeling'); ``ValueError`` naming the allowed values otherwise."""
    if isinstance(likelihood, LikelihoodModel):
        return likelihood
    return _MODELS[Likelihood.parse(likelihood, "likelihood")]


def average_predictions(
    likelihood: LikelihoodModel, chunks: Iterable[Tensor], fitting: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Monte Carlo predictive from chunks of network outputs ``(rows, batch, C)``:
    mean class probabilities, or the mean and variance of the outputs."""
    from laplace.parametric.sampling import mean_and_variance, softmax_mean

    if likelihood.predicts_classes(fitting):
        return softmax_mean(chunks)
    return mean_and_variance(chunks)
