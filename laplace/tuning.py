"""Tuning the prior precision: marginal likelihood (Adam on the log precision)
or a grid search scored on validation data.

The algorithms use a Laplace approximation only through its public surface
(``prior_precision``, ``log_marginal_likelihood``, predictions through
:func:`~laplace.utils.validation_score.validate`); where ``log det P`` is a sum over
the eigenvalues of the curvature, the posterior hands over a :class:`Spectrum`
and the Adam steps use the closed-form gradient: no autograd graph per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from laplace.utils.data import split_batch
from laplace.utils.enums import PredType, PriorStructure, TuningMethod
from laplace.utils.utils import fix_prior_prec_structure
from laplace.utils.validation_score import validate

__all__ = [
    "PriorTuningMixin",
    "tuning_method",
    "Spectrum",
    "adam",
    "marglik_tuning",
    "gridsearch_tuning",
]


@dataclass
class Spectrum:
    """``log det P = sum_i log(e_i + delta_g(i))`` with ``e`` the eigenvalues of
    the scaled curvature ``c H`` ``(n,)`` and ``g(i)`` the prior entry of
    eigenvalue ``i`` (``groups`` ``(n,)``; ``None`` for a scalar prior).

    With ``S_k`` the squared MAP deviations from the prior mean in group ``k``
    (``scatter``) and ``n_k`` the group sizes (``counts``), the negative log
    marginal likelihood is ``const + 1/2 sum_i [log(e_i + delta_g(i)) - log
    delta_g(i)] + 1/2 sum_k delta_k S_k``, so with ``t = log delta``

        d/dt_k = 1/2 (sum_{i in k} delta_k / (e_i + delta_k) - n_k + delta_k S_k).
    """

    eigenvalues: Tensor
    groups: Tensor | None
    counts: Tensor | float
    scatter: Tensor
    #: the lowest ``e_i`` of each group: ``P`` stays positive definite while
    #: ``lowest + delta > 0``
    lowest: Tensor

    @classmethod
    def grouped(
        cls,
        eigenvalues: Tensor,
        finest: int,
        n_priors: int,
        layer_sizes: Sequence[int],
        deviations: Tensor,
        dtype: torch.dtype,
    ) -> Spectrum | None:
        """The spectrum for a prior of ``n_priors`` values from the scaled
        eigenvalues ``(n,)``, the finest prior length they allow (1, one per
        layer in parameter-tensor order, or ``n``) and the MAP deviations
        ``(n,)``; ``None`` when that prior has no closed form."""
        e = eigenvalues.detach().to(dtype)
        if not bool(torch.isfinite(e).all()):
            return None
        n, device = e.numel(), e.device
        if n_priors == 1:
            groups = None
        elif n_priors == n and finest == n:
            groups = torch.arange(n, device=device)
        elif (
            n_priors == len(layer_sizes)
            and finest >= n_priors
            and sum(layer_sizes) == n
        ):
            sizes = torch.tensor(list(layer_sizes), device=device)
            groups = torch.repeat_interleave(
                torch.arange(n_priors, device=device), sizes
            )
        else:
            return None
        squares = deviations.detach().to(dtype) ** 2
        if groups is None:
            return cls(e, None, float(n), squares.sum(), e.min())
        counts = torch.bincount(groups, minlength=n_priors).to(dtype)
        scatter = torch.zeros(n_priors, dtype=dtype, device=device)
        scatter.index_add_(0, groups, squares)
        lowest = torch.full_like(scatter, math.inf).scatter_reduce_(
            0, groups, e, reduce="amin"
        )
        return cls(e, groups, counts, scatter, lowest)

    def gradient(self, log_prior_prec: Tensor) -> Tensor:
        """The gradient of the negative log marginal likelihood w.r.t. ``t``."""
        delta = log_prior_prec.exp()
        e, groups = self.eigenvalues, self.groups
        if groups is None:
            ratio = (delta / (e + delta)).sum()
        else:
            per_eigenvalue = delta[groups]
            ratio = torch.zeros_like(delta).index_add_(
                0, groups, per_eigenvalue / (e + per_eigenvalue)
            )
        return 0.5 * (ratio - self.counts + delta * self.scatter)


def adam(
    x: Tensor,
    gradient: Callable[[Tensor], Tensor],
    steps: Iterable,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
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


def _steps(n_steps: int, progress_bar: bool, desc: str) -> Iterable:
    if not progress_bar:
        return range(n_steps)
    from tqdm.auto import tqdm

    return tqdm(range(n_steps), desc=desc)


def marglik_tuning(
    laplace: Any,
    init: Tensor,
    n_steps: int,
    lr: float,
    spectrum: Spectrum | None,
    progress_bar: bool = False,
) -> Tensor:
    """The prior precision after ``n_steps`` Adam steps on the negative log
    marginal likelihood of ``laplace`` from ``init`` (in log space); the closed
    form of ``spectrum`` when given."""
    steps = _steps(n_steps, progress_bar, "[Optimizing marginal likelihood]")
    if spectrum is not None:
        log_prior_prec, lowest = adam(init.log(), spectrum.gradient, steps, lr)
        if bool((spectrum.lowest + lowest.exp() > 0).all()):
            return log_prior_prec.exp()
        # some step left the positive-definite region: rerun the generic path,
        # which reports it exactly as without the closed form
    log_prior_prec = init.log().detach().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior_prec], lr=lr)
    for _ in steps:
        optimizer.zero_grad()
        neg_log_marglik = -laplace.log_marginal_likelihood(
            prior_precision=log_prior_prec.exp()
        )
        neg_log_marglik.backward()
        optimizer.step()
    return log_prior_prec.detach().exp()


def gridsearch_tuning(
    laplace: Any,
    init: Tensor,
    grid: Tensor,
    val_loader: Iterable,
    loss: Any,
    pred_type: Any,
    link_approx: Any,
    n_samples: int,
    verbose: bool = False,
    progress_bar: bool = False,
) -> Tensor:
    """The prior precision of ``grid`` (each value broadcast like ``init``) with
    the lowest validation ``loss`` of ``laplace``'s predictions; grid points at
    which the posterior is not positive definite score infinity."""
    best_result, best_prior = math.inf, None
    candidates = grid
    if progress_bar:
        from tqdm.auto import tqdm

        candidates = tqdm(grid, desc="[Grid search]")
    for prior_prec in candidates:
        laplace.prior_precision = torch.full_like(init, float(prior_prec))
        try:
            result = validate(
                laplace,
                val_loader,
                loss,
                pred_type,
                link_approx,
                n_samples,
                dict_key_y=laplace.dict_key_y,
            )
        except (RuntimeError, ValueError) as err:
            if "positive definite" not in str(err):
                raise
            result = math.inf
        if not math.isfinite(result):
            result = math.inf
        if verbose:
            print(f"prior precision {float(prior_prec):.4g}: loss {result:.6g}")
        if result < best_result:
            best_result, best_prior = result, laplace.prior_precision.clone()
    if best_prior is None:
        raise ValueError(
            "No prior precision of the grid gave a finite validation loss."
        )
    return best_prior


def tuning_method(default_pred_type: PredType, default_method: str) -> Callable:
    """``optimize_prior_precision`` with laplace-torch's signature, ``pred_type``
    and ``method`` defaulting to the class's predictive and tuning method."""

    def optimize_prior_precision(
        self,
        pred_type: PredType | str = default_pred_type,
        method: str = default_method,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: str = "scalar",
        val_loader: Iterable | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: str = "probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision by maximising the marginal likelihood
        (``method='marglik'``, Adam on the log prior precision) or by a grid search
        on ``val_loader`` (``method='gridsearch'``, lowest ``loss`` wins; default
        loss: NLL for classification, MSE for regression).

        ``prior_structure`` ('scalar', 'layerwise' or 'diag') defaults to 'scalar',
        the effective default of every laplace-torch Laplace class.
        """
        pred_type = self._check_tuning(pred_type, method, prior_structure)
        method = TuningMethod.parse(method, "method")
        prior_structure = PriorStructure.parse(prior_structure, "prior_structure")
        self._check_fitted()
        init = self._initial_prior(init_prior_prec, prior_structure)
        if method is TuningMethod.MARGLIK:
            if not isinstance(n_steps, int) or n_steps < 0:
                raise ValueError(
                    f"n_steps must be a non-negative int; got {n_steps!r}."
                )
            spectrum = self._prior_spectrum(len(init))
            new = marglik_tuning(self, init, n_steps, lr, spectrum, progress_bar)
        else:
            if val_loader is None:
                raise ValueError("method='gridsearch' needs a val_loader.")
            self._check_validation_targets(val_loader)
            grid = torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=log_prior_prec_base,
                dtype=self._dtype,
            )
            if loss is None:
                loss = self._default_tuning_loss()
            new = gridsearch_tuning(
                self,
                init,
                grid,
                val_loader,
                loss,
                pred_type,
                link_approx,
                n_samples,
                verbose,
                progress_bar,
            )
        self.prior_precision = new
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")

    return optimize_prior_precision


class PriorTuningMixin:
    """``optimize_prior_precision`` of :class:`~laplace.BaseLaplace`, written once
    for every class; classes refuse what they cannot tune in
    :meth:`_check_tuning` and hand over a :class:`Spectrum` where the closed
    form applies (:meth:`_prior_spectrum`)."""

    optimize_prior_precision = tuning_method(PredType.GLM, "marglik")

    def _check_tuning(self, pred_type: Any, method: Any, prior_structure: Any) -> Any:
        """Hook: refuse what this class cannot tune; the ``pred_type`` to score
        grid points with."""
        return pred_type

    def _default_tuning_loss(self) -> Any:
        """The loss of a grid search without ``loss``."""
        return self._likelihood_model.default_metric()

    def _prior_spectrum(self, n_priors: int) -> Spectrum | None:
        """Hook: the closed form of the marginal likelihood for ``n_priors``
        prior values (see :class:`laplace.tuning.Spectrum`), or ``None``."""
        return None

    def _initial_prior(self, init_prior_prec: Any, prior_structure: Any) -> Tensor:
        init = fix_prior_prec_structure(
            init_prior_prec,
            prior_structure,
            self.n_layers,
            self.n_params,
            device=self._device,
            dtype=self._dtype,
        )
        if not (torch.isfinite(init).all() and (init > 0).all()):
            raise ValueError(
                f"init_prior_prec must be positive and finite; got {init}."
            )
        return init

    def _check_validation_targets(self, val_loader: Iterable) -> None:
        """Check every batch's targets exactly as ``fit`` checks training targets
        (class labels in range, regression shapes), before any grid point is
        scored."""
        n_batches = 0
        for batch in val_loader:
            _, y = split_batch(batch, self.dict_key_y)
            try:
                self._check_targets(y)
            except ValueError as err:
                raise ValueError(f"val_loader batch {n_batches}: {err}") from err
            n_batches += 1
        if n_batches == 0:
            raise ValueError("val_loader yielded no batches.")
