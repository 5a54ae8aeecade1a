"""Dense float64 ground truth shared by the tests: a tiny MLP, data for it, and
Jacobians, output Hessians and GGNs from ``torch.func`` (independent of the
library's curvature code)."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset


def tiny_net(n_out: int, seed: int = 0) -> nn.Sequential:
    """MLP 2 -> 4 (tanh) -> ``n_out`` in float64; the last layer is module ``2``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, n_out)).double()


def tiny_data(
    likelihood: str, n_out: int, n: int = 24, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, 2)`` and targets: class indices ``(n,)`` or ``(n, n_out)``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(n_out, (n,), generator=gen)
    else:
        y = torch.randn(n, n_out, generator=gen, dtype=torch.float64)
    return X, y


def tiny_loader(
    likelihood: str, n_out: int, n: int = 24, seed: int = 1, batch_size: int = 10
) -> tuple[DataLoader, torch.Tensor]:
    """A loader over ``tiny_data`` and its inputs."""
    X, y = tiny_data(likelihood, n_out, n, seed)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size), X


def dense_jacobians(
    model: nn.Module, X: torch.Tensor, last_layer: bool = False
) -> torch.Tensor:
    """``(batch, n_out, n_params)`` Jacobian w.r.t. all parameters or, with
    ``last_layer``, those of module ``2`` (``tiny_net``'s last layer)."""
    named = {k: v.detach() for k, v in model.named_parameters()}
    if last_layer:
        named = {k: v for k, v in named.items() if k.startswith("2.")}
    jac = jacrev(lambda p: functional_call(model, p, (X,)))(named)
    return torch.cat([j.reshape(len(X), j.shape[1], -1) for j in jac.values()], -1)


def output_hessians(f: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Hessians of the loss w.r.t. the outputs ``f`` ``(batch, n_out)``:
    ``diag(p) - p p^T`` (cross-entropy) or the identity (0.5 * squared error)."""
    if likelihood == "classification":
        p = torch.softmax(f, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.eye(f.shape[-1], dtype=f.dtype).expand(len(f), -1, -1)


def dense_ggn(
    model: nn.Module, X: torch.Tensor, likelihood: str, last_layer: bool = False
) -> torch.Tensor:
    """GGN ``sum_n J_n^T Lambda_n J_n``, ``(n_params, n_params)``."""
    J = dense_jacobians(model, X, last_layer)
    lam = output_hessians(model(X).detach(), likelihood)
    return torch.einsum("nop,noq,nqr->pr", J, lam, J)


# ---- backend tests: an MLP 3 -> 4 -> n_out, a small CNN, and a partly frozen MLP ----
def make_model(name: str, n_out: int) -> nn.Module:
    """``'mlp'``, ``'frozen'`` (first layer without gradients) or ``'cnn'`` (1x4x4
    inputs), float64."""
    torch.manual_seed(0)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, n_out)
        )
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, n_out))
        if name == "frozen":
            model[0].requires_grad_(False)
    return model.to(torch.float64)


def make_data(name: str, likelihood: str, n_out: int, n: int = 5, seed: int = 1):
    """Inputs for ``make_model(name)`` and targets, float64."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 4, 4) if name == "cnn" else (n, 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if likelihood == "regression":
        y = torch.randn(n, n_out, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(n_out, (n,), generator=gen)
    return x, y


class DenseCurvature:
    """Dense curvature of the summed loss (0.5 * SSE or CE) of the *batched*
    output over one flat parameter vector, lazily. ``jacobian(fn, theta)`` gives
    ``(*fn(theta).shape, P)``; subclasses may swap in another independent route."""

    def __init__(self, model: nn.Module, x, y, likelihood: str) -> None:
        named = [
            (n, p.detach()) for n, p in model.named_parameters() if p.requires_grad
        ]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = torch.cat([p.flatten() for _, p in named])
        self.model, self.x, self.y, self.likelihood = model, x, y, likelihood

    @staticmethod
    def jacobian(fn, theta: torch.Tensor) -> torch.Tensor:
        return jacrev(fn)(theta)

    def f_of(self, t):
        chunks = t.split([s.numel() for s in self.shapes])
        params = {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        return functional_call(self.model, params, (self.x,))

    def losses_of(self, t):
        out = self.f_of(t)
        if self.likelihood == "regression":
            return 0.5 * (out - self.y).square().sum(-1)
        return nn.functional.cross_entropy(out, self.y, reduction="none")

    @cached_property
    def f(self):
        return self.f_of(self.theta)

    @cached_property
    def J(self):
        return self.jacobian(self.f_of, self.theta)

    @cached_property
    def ggn(self):
        lam = output_hessians(self.f, self.likelihood)
        return torch.einsum("bop,boq,bqr->pr", self.J, lam, self.J)

    @cached_property
    def grads(self):
        return self.jacobian(self.losses_of, self.theta)

    @cached_property
    def ef(self):
        return self.grads.T @ self.grads

    @cached_property
    def hess(self):
        return hessian(lambda t: self.losses_of(t).sum())(self.theta)

    @cached_property
    def loss(self):
        return self.losses_of(self.theta).sum()
