"""Online marginal-likelihood training (Immer et al. 2021, "Scalable marginal
likelihood estimation for model selection in deep learning", Algorithm 1).

The network is trained on its MAP objective under the current prior while, every
few epochs, a Laplace approximation at the current parameters supplies the log
marginal likelihood, on which the prior precision (and the observation noise) take
a few gradient steps. Weight decay is expressed through the prior precision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from laplace.approximation import BaseLaplace
from laplace.factory import Laplace
from laplace.likelihoods import likelihood_model
from laplace.marglik_arguments import check_arguments, without_weight_decay
from laplace.utils.data import dataset_size, split_batch, to_device
from laplace.utils.enums import HessianStructure, Likelihood, PriorStructure
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.utils import (
    expand_to_parameters,
    fix_prior_prec_structure,
    trainable_parameters,
)

__all__ = ["marglik_training"]


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: Likelihood | str = "classification",
    hessian_structure: HessianStructure | str = "kron",
    backend: type | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: PriorStructure | str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float | torch.Tensor = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
) -> tuple[BaseLaplace, nn.Module, list[float], list[float]]:
    """Train ``model`` and its prior precision (and, for regression, observation
    noise) jointly by online marginal-likelihood maximisation, laplace-torch's
    algorithm:

    1. For epochs ``1..n_epochs``, each batch takes an optimizer step on
       ``criterion(f, y) + 0.5 * theta^T diag(delta) theta / N / c`` with
       ``criterion`` the mean ``CrossEntropyLoss`` or mean ``MSELoss``, ``delta``
       the current prior precision expanded to the treated parameters ``theta``,
       ``c = temperature / (2 sigma^2)`` for regression (``sigma`` the current
       noise, detached) and ``c = temperature`` otherwise; any ``weight_decay``
       of the optimizer is set to 0. ``losses`` gets the epoch's loss per data
       point (batch losses weighted by batch size, divided by ``N``).
    2. When ``epoch % marglik_frequency == 0`` and ``epoch >= n_epochs_burnin``,
       a fresh ``Laplace(model, likelihood, 'all', hessian_structure)`` with the
       current hyperparameters is fitted on ``train_loader`` and ``n_hypersteps``
       Adam steps (``lr_hyp``) are taken on the log prior precision and log
       ``sigma_noise`` against the negative log marginal likelihood; each step's
       value, computed before the step, is appended to ``margliks``.
    3. The model state and hyperparameters of the lowest entry of ``margliks``
       are kept and restored at the end; the returned Laplace approximation is
       fitted on them (on the final ones when no hyperparameter step ran).

    Parameters
    ----------
    model : nn.Module
        Trained in place; only parameters with ``requires_grad=True`` are trained
        and treated by the Laplace approximation.
    train_loader : DataLoader
        Batches ``(X, y)`` or dict-like; ``len(train_loader.dataset)`` is ``N``.
    likelihood : {'classification', 'regression', 'reward_modeling'}
    hessian_structure : {'kron', 'full', 'diag'}, default='kron'
    backend : type of CurvatureInterface, optional
        Defaults to ``AsdlGGN`` (``CurvlinopsGGN``, with a warning, when the ASDL
        backend cannot be imported).
    optimizer_cls, optimizer_kwargs
        Optimizer of the network parameters, e.g. ``{'lr': 1e-3}``.
    scheduler_cls, scheduler_kwargs
        Optional learning-rate scheduler, stepped once per epoch.
    n_epochs : int, default=300
    lr_hyp : float, default=0.1
        Adam learning rate of the log hyperparameters.
    prior_structure : {'layerwise', 'scalar', 'diag'}, default='layerwise'
        One prior precision per parameter tensor, one for all, or one per
        parameter ('diag' is not available with ``hessian_structure='kron'``).
    n_epochs_burnin : int, default=0
        First epoch at which the hyperparameters may be updated.
    n_hypersteps : int, default=10
    marglik_frequency : int, default=1
    prior_prec_init : float or Tensor, default=1
    sigma_noise_init : float, default=1
        Must be 1 unless ``likelihood='regression'``.
    temperature : float, default=1
    fix_sigma_noise : bool, default=False
        Keep ``sigma_noise`` at ``sigma_noise_init`` (regression).
    progress_bar : bool, default=False
    enable_backprop : bool, default=False
        Passed to the returned Laplace approximation.
    dict_key_x, dict_key_y : str
        Keys of inputs and targets in dict-like batches.

    Returns
    -------
    la : ParametricLaplace
        Fitted at the kept parameters, with the kept hyperparameters.
    model : nn.Module
        The trained ``model`` (the same object), in the kept state.
    margliks : list of float
        Negative log marginal likelihood before each hyperparameter step.
    losses : list of float
        The loss per data point of each epoch.
    """
    config = check_arguments(locals())
    likelihood, structure = config["likelihood"], config["structure"]
    if backend is None:
        backend = _default_backend()
    elif not isinstance(backend, type):
        raise TypeError(
            f"backend must be a curvature backend class; got {type(backend)}."
        )

    params = trainable_parameters(model)
    if not params:
        raise ValueError("The model has no parameter with requires_grad=True.")
    device = params[0].device
    dtype = params[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # hyperparameters in the dtype Laplace computes in
    sizes = [p.numel() for p in params]
    n_data = dataset_size(train_loader)

    try:
        init = fix_prior_prec_structure(
            prior_prec_init,
            config["prior_structure"],
            len(sizes),
            sum(sizes),
            device=device,
            dtype=dtype,
        )
    except ValueError as err:
        raise ValueError(
            f"prior_prec_init has {torch.as_tensor(prior_prec_init).numel()} values, "
            f"which does not fit prior_structure={config['prior_structure'].value!r} "
            f"for a model with {len(sizes)} parameter tensors and {sum(sizes)} "
            "parameters."
        ) from err
    if not (torch.isfinite(init).all() and (init > 0).all()):
        raise ValueError(f"prior_prec_init must be positive and finite; got {init}.")
    learn_sigma = likelihood_model(likelihood).has_noise and not fix_sigma_noise
    hyper = _Hyperparameters(init, sigma_noise_init, learn_sigma, lr_hyp)

    optimizer = optimizer_cls(params, **without_weight_decay(optimizer_kwargs))
    scheduler = (
        None
        if scheduler_cls is None
        else scheduler_cls(optimizer, **(scheduler_kwargs or {}))
    )

    def make_laplace(prior_precision: torch.Tensor, sigma: torch.Tensor):
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure=structure,
            sigma_noise=sigma,
            prior_precision=prior_precision,
            temperature=temperature,
            backend=backend,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        )
        la.fit(train_loader)
        return la

    epochs: Iterable[int] = range(1, n_epochs + 1)
    if progress_bar:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc="[Marglik training]")
    training_modes = [(m, m.training) for m in model.modules()]
    margliks: list[float] = []
    losses: list[float] = []
    best = _Best()
    try:
        for epoch in epochs:
            model.train()
            losses.append(
                _train_epoch(
                    model,
                    params,
                    train_loader,
                    optimizer,
                    likelihood,
                    expand_to_parameters(hyper.prior_precision, sizes),
                    hyper.sigma_noise,
                    temperature,
                    n_data,
                    dict_key_x,
                    dict_key_y,
                )
            )
            if scheduler is not None:
                scheduler.step()
            if epoch % marglik_frequency != 0 or epoch < n_epochs_burnin:
                continue
            la = make_laplace(hyper.prior_precision, hyper.sigma_noise)
            for _ in range(n_hypersteps):
                margliks.append(hyper.step(la))
                best.offer(margliks[-1], epoch, model, hyper)
            if progress_bar and margliks:
                epochs.set_postfix(loss=losses[-1], neg_log_marglik=margliks[-1])
    finally:
        for module, training in training_modes:
            module.training = training
    prior_precision, sigma = hyper.prior_precision, hyper.sigma_noise
    if best.state is not None:
        model.load_state_dict(best.state)
        prior_precision, sigma = best.prior_precision, best.sigma_noise
    return make_laplace(prior_precision, sigma), model, margliks, losses


def _train_epoch(
    model: nn.Module,
    params: list[nn.Parameter],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    likelihood: Likelihood,
    prior_diag: torch.Tensor,
    sigma: torch.Tensor,
    temperature: float,
    n_data: int,
    dict_key_x: str,
    dict_key_y: str,
) -> float:
    """One pass over ``loader``; returns the loss per data point."""
    device = params[0].device
    lik = likelihood_model(likelihood)
    criterion = lik.loss_function(reduction="mean")
    # log p(D | theta) = -n_data * c * criterion + const
    c = lik.criterion_scale(sigma, temperature)
    total = 0.0
    for batch in loader:
        X, y = split_batch(batch, dict_key_y)
        X, y = to_device(X, device), y.to(device)
        optimizer.zero_grad()
        f = model(X)
        y = lik.training_targets(y, f)
        theta = parameters_to_vector(params)
        prior = 0.5 * (prior_diag.to(theta.dtype) * theta) @ theta
        loss = criterion(f, y) + prior / n_data / c
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
    return total / n_data


class _Hyperparameters:
    """Prior precision and observation noise, optimised by Adam in log space.

    ``prior_precision`` and ``sigma_noise`` are the current values, detached;
    they stay exactly at their initial values until the first step.
    """

    def __init__(
        self,
        prior_precision: torch.Tensor,
        sigma_noise: float,
        learn_sigma: bool,
        lr: float,
    ) -> None:
        self.prior_precision = prior_precision
        self.sigma_noise = torch.tensor(
            float(sigma_noise),
            device=prior_precision.device,
            dtype=prior_precision.dtype,
        )
        self._log_prior = prior_precision.log().requires_grad_(True)
        self._log_sigma = self.sigma_noise.log().requires_grad_(learn_sigma)
        self._learn_sigma = learn_sigma
        self._optimizer = torch.optim.Adam(
            [self._log_prior, self._log_sigma] if learn_sigma else [self._log_prior],
            lr=lr,
        )

    def step(self, la: BaseLaplace) -> float:
        """One Adam step on the negative log marginal likelihood of ``la``;
        returns that value before the step, at the current values."""
        self._optimizer.zero_grad()
        prior = self._log_prior.exp()
        sigma = self._log_sigma.exp() if self._learn_sigma else None
        neg_marglik = -la.log_marginal_likelihood(prior, sigma)
        #: the values the latest entry was computed at
        self.previous = (
            prior.detach(),
            self.sigma_noise if sigma is None else sigma.detach().reshape(()),
        )
        neg_marglik.backward()
        self._optimizer.step()
        self.prior_precision = self._log_prior.detach().exp()
        if self._learn_sigma:
            self.sigma_noise = self._log_sigma.detach().exp().reshape(())
        return float(neg_marglik.detach())


class _Best:
    """The model state and hyperparameters of the lowest entry so far."""

    def __init__(self) -> None:
        self.value = math.inf
        self.state: dict[str, torch.Tensor] | None = None
        self.prior_precision = self.sigma_noise = None
        self._epoch = None

    def offer(
        self, value: float, epoch: int, model: nn.Module, hyper: _Hyperparameters
    ) -> None:
        """Keep ``value`` if it is the lowest; its hyperparameters are those
        before ``hyper``'s latest step."""
        if not value < self.value:
            return
        self.value = value
        if self._epoch != epoch:  # the model is the same within a phase
            self.state = deepcopy(model.state_dict())
            self._epoch = epoch
        self.prior_precision, self.sigma_noise = hyper.previous


def _default_backend() -> type:
    try:
        from laplace.curvature import AsdlGGN
    except (ImportError, AttributeError) as err:
        from laplace.curvature import CurvlinopsGGN

        warnings.warn(
            f"The default backend AsdlGGN is not available ({err}); using "
            "CurvlinopsGGN instead.",
            stacklevel=3,
        )
        return CurvlinopsGGN
    return AsdlGGN
