"""Unusual models for the robustness tests, and every Laplace class built through
the factory with the few arguments it needs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

#: (subset_of_weights, hessian_structure or functional approximation) of every
#: class the factory builds.
ALL_KEYS = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("all", "lowrank"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
    ("all", "gp"),
    ("last_layer", "gp"),
    ("all", "nystrom"),
    ("all", "variational"),
]
KEY_IDS = [f"{s}-{h}" for s, h in ALL_KEYS]
PARAMETRIC_KEYS = ALL_KEYS[:9]


def make_laplace(model: nn.Module, likelihood: str, key: tuple[str, str], **kwargs):
    """The Laplace class of ``key`` on ``model`` (subnetwork: the 6 largest
    weights; low rank: 3; GP: 8 points; Nystrom: 6 points, 3 eigenvalues;
    variational: 3 inducing points)."""
    subset, structure = key
    if subset == "subnetwork":
        from laplace.utils import LargestMagnitudeSubnetMask

        mask = LargestMagnitudeSubnetMask(model, n_params_subnet=6)
        mask.select()
        kwargs.setdefault("subnetwork_indices", mask.indices)
    if structure == "gp":
        kwargs.setdefault("n_subset", 8)
    if structure == "lowrank":  # Lanczos: cheaper than the dense route here
        kwargs.setdefault("backend_kwargs", {"low_rank": 3})
    if structure == "nystrom":
        kwargs.update(subsample_size=6, n_eigenvalues=3)
    if structure == "variational":
        gen = torch.Generator().manual_seed(5)
        n_in = next(model.parameters()).shape[-1]
        kwargs.setdefault(
            "inducing_locations", torch.randn(3, n_in, generator=gen).double()
        )
    if structure in ("nystrom", "variational"):
        return Laplace(
            model, likelihood, "all", "gp", functional_approximation=structure, **kwargs
        )
    return Laplace(model, likelihood, subset, structure, **kwargs)


def fit_laplace(la, train_loader) -> None:
    """``la.fit(train_loader)``; VaLLA with 5 iterations (it optimises)."""
    from laplace import VaLLA

    if isinstance(la, VaLLA):
        la.fit(train_loader, iterations=5)
    else:
        la.fit(train_loader)


class Net(nn.Module):
    """3 -> 5 (tanh) -> ``n_out`` in float64; ``wrap`` changes what ``forward``
    returns: ``None`` the logits, ``'tuple'``/``'list'``/``'dict'`` them
    wrapped, ``'tanh'`` ``3 tanh(logits)``, ``'seq'`` a ``(batch, 3, n_out)``
    copy."""

    def __init__(self, n_out: int = 2, wrap: str | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, n_out)
        self.wrap = wrap
        self.double()

    def forward(self, x: torch.Tensor):
        f = self.head(self.body(x))
        if self.wrap == "tuple":
            return (f,)
        if self.wrap == "list":
            return [f]
        if self.wrap == "dict":
            return {"logits": f}
        if self.wrap == "tanh":
            return 3 * torch.tanh(f)
        if self.wrap == "seq":
            return f.unsqueeze(1).expand(-1, 3, -1)
        return f


def transposed(model: nn.Module) -> nn.Module:
    """``model`` with every linear weight replaced by a non-contiguous parameter
    of the same values (the transpose of a contiguous tensor)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            module.weight = nn.Parameter(w.T.contiguous().T)
    return model


def loader(likelihood: str, n_out: int = 2, n: int = 12, batch_size: int = 5):
    """Random float64 data for :class:`Net`."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(max(n_out, 2), (n,), generator=gen)
    else:
        y = torch.randn(n, n_out, generator=gen, dtype=torch.float64)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)
