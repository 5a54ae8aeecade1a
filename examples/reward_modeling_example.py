"""Bayesian reward modelling: a Bradley-Terry reward model with a Laplace
posterior.

A single-output network ``r(x)`` is trained on preference pairs: a batch of
pairs ``x`` has shape ``(batch, 2, dim)`` and the label is the index (0 or 1) of
the preferred item. The network maps the pair to the logits ``(r(x_0), r(x_1))``
of shape ``(batch, 2)`` and is trained with cross-entropy, i.e. the Bradley-Terry
likelihood ``p(x_1 preferred) = sigmoid(r(x_1) - r(x_0))``.

With ``likelihood='reward_modeling'``, ``la.fit(pair_loader)`` fits the Laplace
approximation as classification on the pairs, while ``la(x)`` on single items
``(batch, dim)`` predicts the reward as regression: a mean ``(batch, 1)`` and a
variance ``(batch, 1, 1)``. The variance grows away from the training data.

Run ``python examples/reward_modeling_example.py``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace


class RewardModel(nn.Module):
    """Scalar reward per item; on pairs ``(batch, 2, dim)`` the pair dimension is
    kept, giving Bradley-Terry logits ``(batch, 2)``."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reward = self.net(x)
        return reward.squeeze(-1) if x.ndim == 3 else reward


def true_reward(x: torch.Tensor) -> torch.Tensor:
    """``(..., dim) -> (...)``: the hidden preference of the annotators."""
    return torch.sin(2 * x[..., 0]) + x[..., 1]


def make_pairs(
    n: int, dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(n, 2, dim)`` from N(0, I) and Bradley-Terry labels ``(n,)``."""
    x = torch.randn(n, 2, dim, generator=generator)
    r = true_reward(x)
    p_second = torch.sigmoid(3 * (r[:, 1] - r[:, 0]))
    labels = (torch.rand(n, generator=generator) < p_second).long()
    return x, labels


def train(model: nn.Module, loader: DataLoader, n_epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(n_epochs):
        for x, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            optimizer.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-pairs", type=int, default=500)
    parser.add_argument("--dim", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    x_pairs, labels = make_pairs(args.n_pairs, args.dim, gen)
    pair_loader = DataLoader(TensorDataset(x_pairs, labels), batch_size=50)
    model = RewardModel(args.dim)
    train(model, pair_loader, args.epochs)

    la = Laplace(
        model,
        "reward_modeling",
        subset_of_weights="all",
        hessian_structure="kron",
    )
    la.fit(pair_loader)  # classification on pairs
    la.optimize_prior_precision(method="marglik")

    x_in = torch.randn(200, args.dim, generator=gen)  # like the training items
    x_out = 4 * torch.randn(200, args.dim, generator=gen)  # far from them
    mean_in, var_in = la(x_in)  # regression on single items
    _, var_out = la(x_out)
    corr = torch.corrcoef(torch.stack([mean_in.squeeze(-1), true_reward(x_in)]))[0, 1]
    results = {
        "corr_true_reward": corr.item(),
        "std_in": var_in.squeeze().sqrt().mean().item(),
        "std_out": var_out.squeeze().sqrt().mean().item(),
    }
    print(f"reward mean {tuple(mean_in.shape)}, variance {tuple(var_in.shape)}")
    print(f"correlation of the predicted with the true reward: {corr:.3f}")
    print(
        f"mean predictive std: {results['std_in']:.3f} near the data, "
        f"{results['std_out']:.3f} far from it"
    )
    return results


if __name__ == "__main__":
    main()
