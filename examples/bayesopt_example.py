"""Bayesian optimisation with a Laplace-approximated neural-network surrogate.

Maximise the (negated) Forrester function ``-(6x - 2)^2 sin(12x - 4)`` on
``[0, 1]`` (maximum ~6.0207 at x ~0.7572). Each round a small MLP is refit to all
evaluations so far, a last-layer Laplace approximation with
``enable_backprop=True`` gives a predictive mean and variance that are
differentiable w.r.t. the input, and the acquisition function (expected
improvement or UCB) is maximised by gradient ascent from several starting points.

Run ``python examples/bayesopt_example.py``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

LOWER, UPPER = 0.0, 1.0
OPTIMUM = 6.020740055766


def objective(x: torch.Tensor) -> torch.Tensor:
    """Negated Forrester function, ``(n, 1) -> (n, 1)``."""
    return -((6 * x - 2) ** 2) * torch.sin(12 * x - 4)


def fit_surrogate(X: torch.Tensor, y: torch.Tensor, n_epochs: int) -> Laplace:
    """MLP MAP fit to standardised targets, then a last-layer Laplace with prior
    precision and observation noise tuned on the marginal likelihood."""
    model = nn.Sequential(
        nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 50), nn.Tanh(), nn.Linear(50, 1)
    )
    loader = DataLoader(TensorDataset(X, y), batch_size=len(X))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(n_epochs):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        optimizer.step()

    la = Laplace(
        model,
        "regression",
        subset_of_weights="last_layer",
        hessian_structure="full",
        enable_backprop=True,
    )
    la.fit(loader)
    log_prior = torch.zeros(1, requires_grad=True)
    log_sigma = torch.tensor(-2.0, requires_grad=True)
    hyper_optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(100):
        hyper_optimizer.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        hyper_optimizer.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()
    return la


def acquisition(
    la: Laplace, x: torch.Tensor, best: torch.Tensor, kind: str, beta: float = 2.0
) -> torch.Tensor:
    """Expected improvement over ``best`` or the upper confidence bound of the
    latent function, ``(n, 1) -> (n,)``; differentiable w.r.t. ``x``."""
    f_mu, f_var = la(x)
    mean, std = f_mu.squeeze(-1), f_var.reshape(-1).clamp_min(1e-12).sqrt()
    if kind == "ucb":
        return mean + beta * std
    z = (mean - best) / std
    normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    return (mean - best) * normal.cdf(z) + std * normal.log_prob(z).exp()


def maximise_acquisition(
    la: Laplace, best: torch.Tensor, kind: str, n_starts: int, n_steps: int
) -> torch.Tensor:
    """Gradient ascent on the acquisition from ``n_starts`` uniform points, in an
    unconstrained parametrisation ``x = LOWER + (UPPER - LOWER) sigmoid(u)``."""
    u0 = torch.rand(n_starts, 1) * 6 - 3
    u = u0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=0.1)

    def to_x(u: torch.Tensor) -> torch.Tensor:
        return LOWER + (UPPER - LOWER) * torch.sigmoid(u)

    for _ in range(n_steps):
        optimizer.zero_grad()
        # the starts are independent, so one backward of the sum serves all
        (-acquisition(la, to_x(u), best, kind).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        x = to_x(u)
        values = acquisition(la, x, best, kind)
    return x[values.argmax()].reshape(1, 1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n-init", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--starts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--acquisition", choices=["ei", "ucb"], default="ei")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    X = LOWER + (UPPER - LOWER) * torch.rand(args.n_init, 1)
    y = objective(X)
    for round_ in range(args.rounds):
        mean, std = y.mean(), y.std().clamp_min(1e-8)
        la = fit_surrogate(X, (y - mean) / std, args.epochs)
        best = ((y.max() - mean) / std).detach()
        x_next = maximise_acquisition(
            la, best, args.acquisition, args.starts, args.steps
        )
        y_next = objective(x_next)
        X, y = torch.cat([X, x_next]), torch.cat([y, y_next])
        print(
            f"round {round_ + 1:2d}: x = {x_next.item():.4f}, f(x) = "
            f"{y_next.item():8.4f}, best so far {y.max().item():8.4f}"
        )
    best_x = X[y.argmax()].item()
    regret = OPTIMUM - y.max().item()
    print(f"best x = {best_x:.4f}, simple regret {regret:.2e}")
    return {"best_x": best_x, "best_y": y.max().item(), "regret": regret}


if __name__ == "__main__":
    main()
