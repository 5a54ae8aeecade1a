"""Regression on a noisy sinusoid: MAP training, then all-weights and last-layer
Laplace with marginal-likelihood tuning, and a plot of the predictive bands.

Run with ``make demo``; writes ``examples/output/regression_example.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace


def make_data(n_train: int = 150, sigma: float = 0.3, seed: int = 711):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n_train, 1, generator=gen) * 8
    y = torch.sin(X) + sigma * torch.randn(n_train, 1, generator=gen)
    X_test = torch.linspace(-5, 13, 500).unsqueeze(-1)
    return X, y, X_test


def train_map(X: torch.Tensor, y: torch.Tensor, n_epochs: int) -> nn.Module:
    torch.manual_seed(711)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    loader = DataLoader(TensorDataset(X, y), batch_size=150, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    for _ in range(n_epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.mse_loss(model(xb), yb).backward()
            optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    args = parser.parse_args()

    X, y, X_test = make_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=50)
    model = train_map(X, y, args.epochs)

    results = {}
    for subset, structure in [("all", "full"), ("last_layer", "kron")]:
        la = Laplace(
            model, "regression", subset_of_weights=subset, hessian_structure=structure
        )
        la.fit(loader)
        # tune prior precision and observation noise jointly on the marginal likelihood
        log_prior, log_sigma = (
            torch.zeros(1, requires_grad=True),
            torch.zeros(1, requires_grad=True),
        )
        optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
        for _ in range(300):
            optimizer.zero_grad()
            neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
            neg_marglik.backward()
            optimizer.step()
        la.prior_precision, la.sigma_noise = (
            log_prior.detach().exp(),
            log_sigma.detach().exp(),
        )
        f_mu, f_var = la(X_test)
        pred_std = (f_var.squeeze() + la.sigma_noise**2).sqrt()
        marglik = la.log_marginal_likelihood().item()
        results[f"{subset}/{structure}"] = (f_mu.squeeze(), pred_std, marglik)
        print(
            f"{subset:>10}/{structure:<4}  log marglik {marglik:9.2f}  "
            f"prior precision {la.prior_precision.item():.3g}  "
            f"sigma_noise {la.sigma_noise.item():.3f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from laplace.utils.plotting import plot_regression_band

    fig, axes = plt.subplots(
        1, len(results), figsize=(5 * len(results), 3.6), sharey=True
    )
    for ax, (name, (mean, std, marglik)) in zip(axes, results.items()):
        plot_regression_band(
            X, y, X_test, mean, std, ax=ax, title=f"{name}  (log ML {marglik:.1f})"
        )
        ax.set_ylim(-3, 3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "regression_example.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
