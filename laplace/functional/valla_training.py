"""The training of VaLLA (:class:`~laplace.functional.valla.VaLLA`): Adam on
the packed whitened factor ``L``, the log prior precision and (regression) the
log noise variance, maximising minibatch estimates of the alpha-energy
(:mod:`laplace.functional.alpha_energy`). The per-example terms of a small
training set are cached, so a step costs no Jacobians."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from laplace.functional.alpha_energy import (
    categorical_energy,
    gaussian_energy,
    inducing_kl,
)
from laplace.functional.sparse_gp import (
    conditional_parts,
    unpack_lower,
    variational_covariance,
)
from laplace.utils.data import to_device

__all__ = ["AlphaEnergyTraining", "Terms"]

# Per-example kernel terms of the whole training set are cached (and minibatches
# drawn from them) when they hold at most this many numbers.
CACHE_ELEMENTS = 2**24

#: outputs, ``W``, conditional prior covariance and targets of a batch
Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class AlphaEnergyTraining:
    """The training steps of VaLLA; the class provides the inducing Jacobians
    ``_J_Z`` and Cholesky factor ``_chol_K0``, ``L``, ``alpha``,
    ``mc_softmax_samples`` and ``_learns_noise``."""

    def _terms(self, X: Any, y: torch.Tensor) -> Terms:
        """Network outputs, ``W``, conditional prior covariance and targets of a
        batch (see :func:`~laplace.functional.sparse_gp.conditional_parts`)."""
        with torch.no_grad():
            Js, f = self._jacobians(X, False)
            W, prior_cov = conditional_parts(Js, self._J_Z, self._chol_K0)
        return f, W, prior_cov, self._check_targets(y, f.shape[-1])

    def _minibatches(
        self, loader: Iterable, generator: torch.Generator
    ) -> Iterator[Terms]:
        """Endless minibatch terms; from a cache of the whole data set when it is
        small enough (no Jacobians per step), else from the loader's batches."""
        k, n_out = len(self._J_Z), self.n_outputs
        if self.n_data * n_out * (k + n_out) <= CACHE_ELEMENTS:
            parts = [self._terms(X, y) for X, y in self._batches(loader)]
            f, W, prior_cov, y = (
                torch.cat(chunks, dim=1 if i == 1 else 0)  # W is (k, batch, O)
                for i, chunks in enumerate(zip(*parts))
            )
            size = len(parts[0][0])
            while True:
                order = torch.randperm(len(f), generator=generator, device=self._device)
                for idx in order.split(size):
                    yield f[idx], W[:, idx], prior_cov[idx], y[idx]
        while True:
            empty = True
            for X, y in self._batches(loader):
                empty = False
                yield self._terms(X, y)
            if empty:
                raise ValueError("train_loader yielded no batches.")

    def _optimize(
        self,
        loader: Iterable,
        iterations: int,
        lr: float,
        val_loader: Iterable | None,
        val_steps: int | None,
        progress_bar: bool,
    ) -> None:
        packed = self.L.detach().clone().requires_grad_(True)
        log_delta = self.log_prior_precision.detach().clone().requires_grad_(True)
        log_var = self.log_noise_variance.detach().clone()
        variables = [packed, log_delta]
        if self._learns_noise:
            variables.append(log_var.requires_grad_(True))
        optimizer = torch.optim.Adam(variables, lr=lr)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        steps = range(1, iterations + 1)
        if progress_bar:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="VaLLA fit")
        batches = self._minibatches(loader, generator)
        for step in steps:
            optimizer.zero_grad()
            objective = self._objective(
                next(batches), packed, log_delta, log_var, generator
            )
            (-objective).backward()
            optimizer.step()
            # laplace-torch's sign: the loss Adam minimises
            self.fit_history_["objective"].append(-float(objective.detach()))
            self.L = packed.detach().clone()
            self.prior_precision = log_delta.detach().exp()
            if self._learns_noise:
                self.sigma_noise = (0.5 * log_var.detach()).exp()
            periodic = val_steps is not None and step % val_steps == 0
            if val_loader is not None and (periodic or step == iterations):
                self.fit_history_["val_nll"].append(self._validation_nll(val_loader))

    def objective(
        self,
        X: Any,
        y: torch.Tensor,
        packed_L: torch.Tensor,
        log_prior_precision: torch.Tensor,
        log_noise_variance: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Minibatch estimate of the alpha-energy, ``()``: the data term of the
        batch ``(X, y)`` scaled by ``n_data / batch / temperature``, minus the KL;
        differentiable w.r.t. the packed whitened factor ``packed_L`` and the two
        log hyperparameters; ``fit`` maximises it."""
        self._check_fitted()
        terms = self._terms(to_device(X, self._device), y.to(self._device))
        return self._objective(
            terms, packed_L, log_prior_precision, log_noise_variance, generator
        )

    def _objective(
        self,
        terms: Terms,
        packed_L: torch.Tensor,
        log_delta: torch.Tensor,
        log_var: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        f, W, prior_cov, y = terms
        delta = log_delta.exp()
        L = unpack_lower(packed_L, len(self._J_Z))
        cov = prior_cov / delta + variational_covariance(W, L)
        if self._learns_noise:
            energy = gaussian_energy(y.to(f.dtype), f, cov, log_var.exp(), self.alpha)
        else:
            energy = categorical_energy(
                y, f, cov, self.alpha, self.mc_softmax_samples, generator
            )
        scale = self.n_data / len(f) / self.temperature
        return scale * energy - inducing_kl(L, delta)
