"""Benchmark workloads: models, synthetic data and the (workload, structure,
subset) configurations that ``run.py`` times, plus each workload's floor (plain
forward and backward epochs of the same model, data and batch size).

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
    n_train: int = N_TRAIN
    # fit-only workloads time the fit (and its floor) at a realistic data size;
    # the other operations do not depend on the number of training points
    fit_only: bool = False
    arch: str = ""  # model family when it differs from the name

    @property
    def architecture(self) -> str:
        """Model family (``mlp-reg``, ``mlp-clf`` or ``cnn-clf``)."""
        return self.arch or self.name

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        if self.architecture == "mlp-reg":
            return nn.Sequential(
                nn.Linear(1, 50),
                nn.Tanh(),
                nn.Linear(50, 50),
                nn.Tanh(),
                nn.Linear(50, 1),
            )
        if self.architecture == "mlp-clf":
            return nn.Sequential(
                nn.Flatten(),
                nn.Linear(784, 128),
                nn.ReLU(),
                nn.Linear(128, 128),
                nn.ReLU(),
                nn.Linear(128, 10),
            )
        if self.architecture == "cnn-clf":
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
        # the data sizes of the fit-floor targets (issue 16), fits only
        Workload("mlp-clf-6k", "classification", (784,), 10, 6000, True, "mlp-clf"),
        Workload(
            "cnn-clf-4k", "classification", (1, 28, 28), 10, 4000, True, "cnn-clf"
        ),
    )
}


def _wanted(workload: Workload, subset: str, structure: str) -> bool:
    if structure != "full" or subset != "all":
        return True
    # full covariance only where P x P fits comfortably (not the 118k-parameter
    # MLP) and the fit does not take minutes (not at the large data sizes)
    return workload.architecture != "mlp-clf" and not workload.fit_only


CONFIGS = [
    f"{name}/{subset}/{structure}"
    for name, workload in WORKLOADS.items()
    for subset in ("all", "last_layer")
    for structure in ("full", "kron", "diag")
    if _wanted(workload, subset, structure)
]

OPS = ("fit", "marglik", "glm", "nn")

# Floor operations: one epoch over the training loader of
# - "fwd": forward passes without autograd (the floor of a last-layer fit, which
#   needs the features and the outputs once),
# - "fwd+bwd": forward and one backward pass of the summed loss (a training epoch),
# - "fwd+Cbwd": forward and one backward pass per output (C passes; the floor of an
#   all-weights fit with the exact GGN: KFAC, diagonal and full all need the
#   backpropagated sqrt of the loss Hessian, one vector per output).
FLOOR_OPS = ("fwd", "fwd+bwd", "fwd+Cbwd")


def floor_config(config: str) -> str:
    """The floor configuration of ``config``'s workload: ``"<workload>/floor"``."""
    return f"{config.split('/')[0]}/floor"


def floor_op(config: str) -> str:
    """The floor operation a fit of ``config`` is compared with.

    Last-layer fits: one forward epoch. All-weights fits (Kron, diagonal, full):
    a forward epoch with one backward pass per output.
    """
    _, subset, _ = config.split("/")
    return "fwd" if subset == "last_layer" else "fwd+Cbwd"


def floor_multiple(fit_s: float | None, floor_s: float | None) -> float | None:
    """``fit_s / floor_s``, or ``None`` when either time is missing or zero."""
    if not fit_s or not floor_s:
        return None
    return fit_s / floor_s


def setup_workload(name: str, device: str):
    """Workload ``name``: its model, train loader and test inputs, on ``device``."""
    workload = WORKLOADS[name]
    model = workload.model().to(device)
    X, y = workload.data(workload.n_train, seed=1)
    X_test, _ = workload.data(N_TEST, seed=2)
    loader = DataLoader(
        TensorDataset(X.to(device), y.to(device)), batch_size=BATCH_SIZE
    )
    return workload, model, loader, X_test.to(device)


def setup(config: str, device: str):
    """Model, train loader and test inputs of ``config``, on ``device``."""
    name, subset, structure = config.split("/")
    return (*setup_workload(name, device), subset, structure)


def floor_operations(config: str, device: str):
    """``{op: callable}`` of the floor operations (:data:`FLOOR_OPS`) of the
    workload of ``config`` (``"<workload>/floor"``): plain torch, same model, data
    and batch size as its fits."""
    workload, model, loader, _ = setup_workload(config.split("/")[0], device)
    return floor_functions(model, loader, workload.likelihood)


def floor_functions(model: nn.Module, loader, likelihood: str):
    """``{op: callable}`` of the floor operations (:data:`FLOOR_OPS`): epochs over
    ``loader`` (batches ``(X, y)``) of ``model``, gradients of the parameters that
    require them."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = (
        nn.CrossEntropyLoss(reduction="sum")
        if likelihood == "classification"
        else nn.MSELoss(reduction="sum")
    )

    def forward():
        with torch.no_grad():
            for X, _ in loader:
                model(X)

    def forward_backward():
        for X, y in loader:
            torch.autograd.grad(loss_fn(model(X), y), params)

    def forward_c_backward():
        for X, _ in loader:
            out = model(X)
            for c in range(out.shape[-1]):
                last = c == out.shape[-1] - 1
                torch.autograd.grad(out[:, c].sum(), params, retain_graph=not last)

    return {"fwd": forward, "fwd+bwd": forward_backward, "fwd+Cbwd": forward_c_backward}


def operations(config: str, device: str):
    """``{op: callable}`` for ``config``; each call is one timed repetition.

    Every operation uses only the laplace-torch 0.3 public API with its default
    arguments (default backend, probit link for classification). Fit-only
    workloads only have ``fit``; ``"<workload>/floor"`` has the floor operations.
    """
    if config.endswith("/floor"):
        return floor_operations(config, device)

    from laplace import Laplace

    workload, model, loader, X_test, subset, structure = setup(config, device)

    def make():
        return Laplace(
            model,
            workload.likelihood,
            subset_of_weights=subset,
            hessian_structure=structure,
        )

    def fit():
        make().fit(loader)

    if workload.fit_only:
        return {"fit": fit}

    fitted = make()
    fitted.fit(loader)

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
