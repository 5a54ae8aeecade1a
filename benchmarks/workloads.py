"""Benchmark workloads: models, synthetic data and the (workload, structure,
subset) configurations that ``run.py`` times.

Only torch and the laplace-torch-compatible public API are used here, so the same
file runs under laplace-torch for a side-by-side comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_TRAIN = 512
N_TEST = 1000
BATCH_SIZE = 128
NN_SAMPLES = 100
MARGLIK_STEPS = 100


@dataclass(frozen=True)
class Workload:
    """A model family with its likelihood and input shape."""

    name: str
    likelihood: str
    input_shape: tuple[int, ...]
    n_outputs: int

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        if self.name == "mlp-reg":
            return nn.Sequential(
                nn.Linear(1, 50),
                nn.Tanh(),
                nn.Linear(50, 50),
                nn.Tanh(),
                nn.Linear(50, 1),
            )
        if self.name == "mlp-clf":
            return nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 128),
                nn.ReLU(),
                nn.Linear(128, 128),
                nn.ReLU(),
                nn.Linear(128, 10),
            )
        if self.name == "cnn-clf":
            return nn.Sequential(
                nn.Conv2d(1, 6, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(6, 12, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(12 * 3 * 3, 10),
            )
        raise ValueError(f"unknown workload {self.name!r}")

    def data(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        X = torch.randn(n, *self.input_shape, generator=gen)
        if self.likelihood == "classification":
            y = torch.randint(self.n_outputs, (n,), generator=gen)
        else:
            y = torch.sin(3 * X) + 0.1 * torch.randn(n, 1, generator=gen)
        return X, y


WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp-reg", "regression", (1,), 1),
        Workload("mlp-clf", "classification", (784,), 10),
        Workload("cnn-clf", "classification", (1, 28, 28), 10),
    )
}

# Full covariance only where P x P fits comfortably (not the 118k-parameter MLP).
CONFIGS = [
    f"{w}/{subset}/{structure}"
    for w in WORKLOADS
    for subset in ("all", "last_layer")
    for structure in ("full", "kron", "diag")
    if not (w == "mlp-clf" and subset == "all" and structure == "full")
]

OPS = ("fit", "marglik", "glm", "nn")


def setup(config: str, device: str):
    """Model, train loader and test inputs of ``config``, on ``device``."""
    name, subset, structure = config.split("/")
    workload = WORKLOADS[name]
    model = workload.model().to(device)
    X, y = workload.data(N_TRAIN, seed=1)
    X_test, _ = workload.data(N_TEST, seed=2)
    loader = DataLoader(
        TensorDataset(X.to(device), y.to(device)), batch_size=BATCH_SIZE
    )
    return workload, model, loader, X_test.to(device), subset, structure


def operations(config: str, device: str):
    """``{op: callable}`` for ``config``; each call is one timed repetition.

    Every operation uses only the laplace-torch 0.3 public API with its default
    arguments (default backend, probit link for classification).
    """
    from laplace import Laplace

    workload, model, loader, X_test, subset, structure = setup(config, device)

    def make():
        return Laplace(
            model,
            workload.likelihood,
            subset_of_weights=subset,
            hessian_structure=structure,
        )

    fitted = make()
    fitted.fit(loader)

    def fit():
        make().fit(loader)

    def marglik():
        fitted.prior_precision = 1.0
        fitted.optimize_prior_precision(
            method="marglik", n_steps=MARGLIK_STEPS, prior_structure="scalar"
        )

    def glm():
        fitted(X_test, pred_type="glm", link_approx="probit")

    def nn_predictive():
        fitted(X_test, pred_type="nn", link_approx="mc", n_samples=NN_SAMPLES)

    return {"fit": fit, "marglik": marglik, "glm": glm, "nn": nn_predictive}
