"""Tuning the prior precision: marginal likelihood (Adam on the log precision)
or a grid search scored on validation data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from laplace.likelihoods import likelihood_model
from laplace.utils.data import split_batch
from laplace.utils.enums import PriorStructure, TuningMethod
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
        _check_validation_targets(la, val_loader)
        if loss is None:
            loss = likelihood_model(la.likelihood).default_metric()
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
    steps = range(n_steps)
    if progress_bar:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="[Optimizing marginal likelihood]")
    spectral = _spectral_gradient(la, len(init))
    if spectral is not None:
        gradient, lowest_eigenvalues = spectral
        log_prior_prec, lowest = _adam(init.log(), gradient, steps, lr)
        if bool((lowest_eigenvalues + lowest.exp() > 0).all()):
            la.prior_precision = log_prior_prec.exp()
            return
        # some step left the positive-definite region: rerun the generic path,
        # which reports it exactly as without the closed form
    log_prior_prec = init.log().detach().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior_prec], lr=lr)
    for _ in steps:
        optimizer.zero_grad()
        neg_log_marglik = -la.log_marginal_likelihood(
            prior_precision=log_prior_prec.exp()
        )
        neg_log_marglik.backward()
        optimizer.step()
    la.prior_precision = log_prior_prec.detach().exp()


def _adam(
    x: torch.Tensor,
    gradient: Callable[[torch.Tensor], torch.Tensor],
    steps: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam with ``torch.optim.Adam``'s defaults and update rule, without its
    per-step dispatch overhead (which dominates when a gradient costs microseconds).

    Returns the final iterate and the element-wise lowest value of all iterates at
    which the gradient was evaluated.
    """
    x = x.detach().clone()
    lowest = x.clone()
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for t, _ in enumerate(steps, start=1):
        g = gradient(x)
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        denom = (v.sqrt() / math.sqrt(1 - betas[1] ** t)).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - betas[0] ** t))
        torch.minimum(lowest, x, out=lowest)
    return x, lowest


def _spectral_gradient(
    la: Any, n_priors: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | None:
    """Closed-form gradient of the negative log marginal likelihood w.r.t. the log
    prior precision ``t`` (``(n_priors,)``) and the lowest ``e_i`` of each prior
    group, or ``None`` where there is no closed form.

    With ``log det P = sum_i log(e_i + delta_g(i))`` (``e = c * eigenvalues of H``,
    ``g(i)`` the prior entry of eigenvalue ``i``), the objective is
    ``const + 1/2 sum_i [log(e_i + delta_g(i)) - log delta_g(i)] + 1/2 sum_k delta_k
    S_k`` with ``S_k`` the squared MAP deviations of group ``k``, so

        d/dt_k = 1/2 (sum_{i in k} delta_k / (e_i + delta_k) - n_k + delta_k S_k).

    The eigenvalues are computed once, so each step is O(n) without autograd.
    """
    spectrum = getattr(la, "_H_spectrum", lambda: None)()
    if spectrum is None:
        return None
    eigenvalues, finest = spectrum
    n = eigenvalues.numel()
    sizes = getattr(la, "_layer_sizes", [])
    device = eigenvalues.device
    if n_priors == 1:
        groups = None
    elif n_priors == n and finest == n:
        groups = torch.arange(n, device=device)
    elif n_priors == len(sizes) and finest >= n_priors and sum(sizes) == n:
        groups = torch.repeat_interleave(
            torch.arange(n_priors, device=device), torch.tensor(sizes, device=device)
        )
    else:
        return None
    e = (la._H_factor * eigenvalues).detach().to(la._dtype)
    if not bool(torch.isfinite(e).all()):
        return None
    squares = la._prior_deviation.detach().to(e.dtype) ** 2
    if groups is None:
        counts, scatter, lowest = float(n), squares.sum(), e.min()
    else:
        counts = torch.bincount(groups, minlength=n_priors).to(e.dtype)
        scatter = torch.zeros(n_priors, dtype=e.dtype, device=device)
        scatter.index_add_(0, groups, squares)
        lowest = torch.full_like(scatter, math.inf).scatter_reduce_(
            0, groups, e, reduce="amin"
        )

    def gradient(log_prior_prec: torch.Tensor) -> torch.Tensor:
        delta = log_prior_prec.exp()
        if groups is None:
            ratio = (delta / (e + delta)).sum()
        else:
            per_eigenvalue = delta[groups]
            ratio = torch.zeros_like(delta).index_add_(
                0, groups, per_eigenvalue / (e + per_eigenvalue)
            )
        return 0.5 * (ratio - counts + delta * scatter)

    return gradient, lowest


def _check_validation_targets(la: Any, val_loader: Iterable) -> None:
    """Check every batch's targets exactly as ``fit`` checks training targets
    (class labels in range, regression shapes), before any grid point is
    scored."""
    n_batches = 0
    for batch in val_loader:
        _, y = split_batch(batch, la.dict_key_y)
        try:
            likelihood_model(la.likelihood).check_targets(y, la.n_outputs)
        except ValueError as err:
            raise ValueError(f"val_loader batch {n_batches}: {err}") from err
        n_batches += 1
    if n_batches == 0:
        raise ValueError("val_loader yielded no batches.")


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
            result = validate(
                la,
                val_loader,
                loss,
                pred_type,
                link_approx,
                n_samples,
                dict_key_y=la.dict_key_y,
            )
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
