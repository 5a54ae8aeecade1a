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
from typing import Any

import torch
from torch import nn

from laplace.base import BaseLaplace
from laplace.factory import Laplace
from laplace.utils.data import dataset_size, split_batch, to_device
from laplace.utils.enums import HessianStructure, Likelihood, PriorStructure
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.utils import (
    expand_to_parameters,
    fix_prior_prec_structure,
    trainable_parameters,
)

__all__ = ["marglik_training"]

_STRUCTURES = (HessianStructure.FULL, HessianStructure.KRON, HessianStructure.DIAG)


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
    noise) jointly by online marginal-likelihood maximisation.

    Each epoch minimises, batch by batch, the negative log joint per data point
    ``nll(batch) / temperature + 0.5 * sum_i delta_i theta_i^2 / N`` (``nll`` the
    batch mean; ``delta`` the current prior precision expanded to the treated
    parameters; any ``weight_decay`` of the optimizer is set to 0). After epoch
    ``e`` (1-based) with ``e > n_epochs_burnin`` and ``e % marglik_frequency == 0``
    a Laplace approximation ``Laplace(model, likelihood, 'all', hessian_structure)``
    is fitted on ``train_loader`` and ``n_hypersteps`` Adam steps (``lr_hyp``) are
    taken on the log prior precision and log ``sigma_noise`` against the negative
    log marginal likelihood.

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
        Epochs of plain MAP training before the first hyperparameter update.
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
        Fitted at the final parameters, with the final hyperparameters.
    model : nn.Module
        The trained ``model`` (the same object).
    margliks : list of float
        Log marginal likelihood after each hyperparameter update.
    losses : list of float
        Per epoch, the MAP objective summed over batches, weighted by batch size
        and divided by ``N`` (the negative log joint per data point, without the
        constants of the Gaussian likelihood).
    """
    config = _check_arguments(locals())
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
    learn_sigma = likelihood is Likelihood.REGRESSION and not fix_sigma_noise
    hyper = _Hyperparameters(init, sigma_noise_init, learn_sigma, lr_hyp)

    optimizer = optimizer_cls(params, **_without_weight_decay(optimizer_kwargs))
    scheduler = (
        None
        if scheduler_cls is None
        else scheduler_cls(optimizer, **(scheduler_kwargs or {}))
    )

    def make_laplace() -> BaseLaplace:
        la = Laplace(
            model,
            likelihood,
            subset_of_weights="all",
            hessian_structure=structure,
            sigma_noise=hyper.sigma_noise,
            prior_precision=hyper.prior_precision,
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
    la, la_epoch = None, 0
    try:
        for epoch in epochs:
            model.train()
            prior_diag = expand_to_parameters(hyper.prior_precision, sizes)
            losses.append(
                _train_epoch(
                    model,
                    params,
                    train_loader,
                    optimizer,
                    likelihood,
                    prior_diag,
                    hyper.sigma_noise,
                    temperature,
                    n_data,
                    dict_key_x,
                    dict_key_y,
                )
            )
            if scheduler is not None:
                scheduler.step()
            if epoch <= n_epochs_burnin or epoch % marglik_frequency != 0:
                continue
            la, la_epoch = make_laplace(), epoch
            margliks.append(hyper.update(la, n_hypersteps))
            if progress_bar:
                epochs.set_postfix(loss=losses[-1], log_marglik=margliks[-1])
    finally:
        for module, training in training_modes:
            module.training = training
    if la is None or la_epoch != n_epochs:
        la = make_laplace()
    return la, model, margliks, losses


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
    """One pass over ``loader``; returns the per-data-point MAP objective."""
    device = params[0].device
    total = torch.zeros((), device=device)
    for batch in loader:
        X, y = split_batch(batch, dict_key_x, dict_key_y)
        X, y = to_device(X, device), y.to(device)
        optimizer.zero_grad()
        f = model(X)
        if likelihood is Likelihood.REGRESSION:
            if y.ndim == 1 and f.ndim == 2 and f.shape[1] == 1:
                y = y.unsqueeze(-1)
            if y.shape != f.shape:
                raise ValueError(
                    f"Regression targets of shape {tuple(y.shape)} do not match the "
                    f"model output of shape {tuple(f.shape)}."
                )
            nll = 0.5 * (f - y).square().sum() / (sigma.square() * len(f))
        else:
            nll = nn.functional.cross_entropy(f, y)
        theta = parameters_to_vector(params)
        prior = 0.5 * (prior_diag.to(theta.dtype) * theta.square()).sum() / n_data
        loss = nll / temperature + prior
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(f) / n_data
    return float(total)


class _Hyperparameters:
    """Prior precision and observation noise, optimised by Adam in log space.

    The values are kept separately from their logarithms so that they stay exactly
    at their initial values until the first update.
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

    def _log_marglik(self, la: BaseLaplace) -> torch.Tensor:
        sigma = self._log_sigma.exp() if self._learn_sigma else None
        return la.log_marginal_likelihood(self._log_prior.exp(), sigma)

    def update(self, la: BaseLaplace, n_steps: int) -> float:
        """Take ``n_steps`` Adam steps on the negative log marginal likelihood of
        ``la``; leave the new values in ``la`` and return its log marginal
        likelihood there."""
        if n_steps == 0:
            return float(la.log_marginal_likelihood().detach())
        for _ in range(n_steps):
            self._optimizer.zero_grad()
            (-self._log_marglik(la)).backward()
            self._optimizer.step()
        with torch.no_grad():
            marglik = self._log_marglik(la)
        self.prior_precision = la.prior_precision.detach()
        la.prior_precision = self.prior_precision
        if self._learn_sigma:
            self.sigma_noise = la.sigma_noise.detach()
            la.sigma_noise = self.sigma_noise
        return float(marglik)


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


def _without_weight_decay(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {"weight_decay": 0.0}
    if not isinstance(kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict or None; got {type(kwargs)}.")
    if kwargs.get("weight_decay", 0) != 0:
        warnings.warn(
            f"optimizer_kwargs weight_decay={kwargs['weight_decay']} is ignored: the "
            "prior precision takes the role of weight decay in marglik_training.",
            stacklevel=3,
        )
    return {**kwargs, "weight_decay": 0.0}


def _check_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """Validate the arguments of :func:`marglik_training`; return parsed enums."""
    if not isinstance(args["model"], nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(args['model'])}.")
    likelihood = Likelihood.parse(args["likelihood"], "likelihood")
    structure = HessianStructure.parse(args["hessian_structure"], "hessian_structure")
    if structure not in _STRUCTURES:
        raise ValueError(
            f"Invalid hessian_structure={structure.value!r} for marglik_training; "
            f"allowed values are {[s.value for s in _STRUCTURES]}."
        )
    prior_structure = PriorStructure.parse(args["prior_structure"], "prior_structure")
    if structure is HessianStructure.KRON and prior_structure is PriorStructure.DIAG:
        raise ValueError(
            "prior_structure='diag' is not available with hessian_structure='kron' "
            "(a per-parameter prior breaks the Kronecker structure); use 'scalar' or "
            "'layerwise'."
        )
    for name, minimum in (
        ("n_epochs", 1),
        ("n_epochs_burnin", 0),
        ("n_hypersteps", 0),
        ("marglik_frequency", 1),
    ):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    for name in ("lr_hyp", "sigma_noise_init", "temperature"):
        value = args[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    if likelihood is not Likelihood.REGRESSION and args["sigma_noise_init"] != 1:
        raise ValueError(
            f"sigma_noise_init={args['sigma_noise_init']!r} is only meaningful for "
            f"regression; it must be 1 for likelihood={likelihood.value!r}."
        )
    if args["scheduler_kwargs"] is not None and not isinstance(
        args["scheduler_kwargs"], dict
    ):
        raise TypeError(
            f"scheduler_kwargs must be a dict or None; got "
            f"{type(args['scheduler_kwargs'])}."
        )
    for name in ("dict_key_x", "dict_key_y"):
        if not isinstance(args[name], str):
            raise TypeError(f"{name} must be a str; got {args[name]!r}.")
    return {
        "likelihood": likelihood,
        "structure": structure.value,
        "prior_structure": prior_structure,
    }
