"""Tuning the prior precision: marginal likelihood (Adam on the log precision)
or a grid search scored on validation data."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from laplace.utils.enums import Likelihood, PriorStructure, TuningMethod
from laplace.utils.metrics import RunningMSEMetric, RunningNLLMetric
from laplace.utils.utils import fix_prior_prec_structure
from laplace.utils.validation import validate


def _initial_prior(la: Any, init_prior_prec: Any, prior_structure: Any) -> torch.Tensor:
    init = fix_prior_prec_structure(
        init_prior_prec,
        prior_structure,
        la.n_layers,
        la.n_params,
        device=la._device,
        dtype=la._dtype,
    )
    if not (torch.isfinite(init).all() and (init > 0).all()):
        raise ValueError(f"init_prior_prec must be positive and finite; got {init}.")
    return init


def optimize_prior_precision(
    la: Any,
    pred_type: Any,
    method: TuningMethod | str,
    n_steps: int,
    lr: float,
    init_prior_prec: float | torch.Tensor,
    prior_structure: PriorStructure | str,
    val_loader: Iterable | None,
    loss: Any,
    log_prior_prec_min: float,
    log_prior_prec_max: float,
    grid_size: int,
    link_approx: Any,
    n_samples: int,
    verbose: bool,
    progress_bar: bool,
    log_prior_prec_base: float,
) -> None:
    """See :meth:`laplace.BaseLaplace.optimize_prior_precision`."""
    method = TuningMethod.parse(method, "method")
    prior_structure = PriorStructure.parse(prior_structure, "prior_structure")
    la._check_fitted()
    init = _initial_prior(la, init_prior_prec, prior_structure)
    if method is TuningMethod.MARGLIK:
        if not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be a non-negative int; got {n_steps!r}.")
        _marglik(la, init, n_steps, lr, verbose, progress_bar)
    else:
        if val_loader is None:
            raise ValueError("method='gridsearch' needs a val_loader.")
        if loss is None:
            loss = (
                RunningNLLMetric()
                if la.likelihood is Likelihood.CLASSIFICATION
                else RunningMSEMetric()
            )
        _gridsearch(
            la,
            init,
            val_loader,
            loss,
            pred_type,
            link_approx,
            n_samples,
            torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=log_prior_prec_base,
                dtype=la._dtype,
            ),
            verbose,
            progress_bar,
        )
    if verbose:
        print(f"Optimized prior precision is {la.prior_precision}.")


def _marglik(
    la: Any,
    init: torch.Tensor,
    n_steps: int,
    lr: float,
    verbose: bool,
    progress_bar: bool,
) -> None:
    log_prior_prec = init.log().detach().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior_prec], lr=lr)
    steps = range(n_steps)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="[Optimizing marginal likelihood]")
    for _ in steps:
        optimizer.zero_grad()
        neg_log_marglik = -la.log_marginal_likelihood(
            prior_precision=log_prior_prec.exp()
        )
        neg_log_marglik.backward()
        optimizer.step()
    la.prior_precision = log_prior_prec.detach().exp()


def _gridsearch(
    la: Any,
    init: torch.Tensor,
    val_loader: Iterable,
    loss: Any,
    pred_type: Any,
    link_approx: Any,
    n_samples: int,
    grid: torch.Tensor,
    verbose: bool,
    progress_bar: bool,
) -> None:
    best_result, best_prior = math.inf, None
    candidates = grid
    if progress_bar:
        from tqdm.auto import tqdm

        candidates = tqdm(grid, desc="[Grid search]")
    for prior_prec in candidates:
        la.prior_precision = torch.full_like(init, float(prior_prec))
        try:
            result = validate(la, val_loader, loss, pred_type, link_approx, n_samples)
        except (RuntimeError, ValueError) as err:
            # a grid point at which the posterior is not positive definite
            if "positive definite" not in str(err):
                raise
            result = math.inf
        if not math.isfinite(result):
            result = math.inf
        if verbose:
            print(f"prior precision {float(prior_prec):.4g}: loss {result:.6g}")
        if result < best_result:
            best_result, best_prior = result, la.prior_precision.clone()
    if best_prior is None:
        raise ValueError(
            "No prior precision of the grid gave a finite validation loss."
        )
    la.prior_precision = best_prior
