"""Every public Laplace class, how to build it through the class and through the
``Laplace`` factory, and its laplace-torch 0.3 constructor signature (from
/work/shared/reference/api-inventory.md section 1.2 and the laplace-torch API
docs). Shared by the API tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import laplace

N_IN, N_HIDDEN, N_OUT = 3, 4, 2
# tiny_model: Linear(3, 4) -> Tanh -> Linear(4, 2)
N_LAYERS, N_PARAMS = 4, N_IN * N_HIDDEN + N_HIDDEN + N_HIDDEN * N_OUT + N_OUT
LL_LAYERS, LL_PARAMS = 2, N_HIDDEN * N_OUT + N_OUT
SUBNET = torch.tensor([0, 3, 7, 20, 25])


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT)
    ).double()


BASE = [
    "sigma_noise",
    "prior_precision",
    "prior_mean",
    "temperature",
    "enable_backprop",
    "dict_key_x",
    "dict_key_y",
]
LL_BASE = [*BASE[:5], "feature_reduction", "dict_key_x", "dict_key_y", "backend"]


@dataclass
class Case:
    """One class: ``required`` are its extra required arguments (after
    ``model, likelihood``); ``signature`` laplace-torch's parameter order after
    ``model, likelihood``; ``precision_lengths``/``mean_lengths`` the lengths of
    a 1-d prior it accepts."""

    cls: type
    subset: str
    structure: str
    signature: list[str]
    required: dict[str, Any] = field(default_factory=dict)
    factory: dict[str, Any] = field(default_factory=dict)
    n_layers: int = N_LAYERS
    n_params: int = N_PARAMS
    precision_lengths: tuple[int, ...] = (1, N_LAYERS, N_PARAMS)
    mean_lengths: tuple[int, ...] = (1, N_PARAMS)
    zero_mean_only: bool = False

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(self, via: str, likelihood: str = "regression", **kwargs: Any):
        model = tiny_model()
        kwargs = {**self.required, **kwargs}
        if via == "class":
            return self.cls(model, likelihood, **kwargs)
        return laplace.Laplace(
            model, likelihood, self.subset, self.structure, **self.factory, **kwargs
        )


CASES = [
    Case(
        laplace.FullLaplace,
        "all",
        "full",
        [*BASE, "backend", "backend_kwargs", "asdl_fisher_kwargs"],
    ),
    Case(
        laplace.KronLaplace,
        "all",
        "kron",
        [*BASE, "backend", "damping", "backend_kwargs", "asdl_fisher_kwargs"],
        precision_lengths=(1, N_LAYERS),
    ),
    Case(
        laplace.DiagLaplace,
        "all",
        "diag",
        [*BASE, "backend", "backend_kwargs", "asdl_fisher_kwargs"],
    ),
    Case(
        laplace.LowRankLaplace,
        "all",
        "lowrank",
        ["backend", *BASE, "backend_kwargs"],
    ),
    Case(
        laplace.FullLLLaplace,
        "last_layer",
        "full",
        [*LL_BASE, "last_layer_name", "backend_kwargs", "asdl_fisher_kwargs"],
        required={"last_layer_name": "2"},
        n_layers=LL_LAYERS,
        n_params=LL_PARAMS,
        precision_lengths=(1, LL_LAYERS, LL_PARAMS),
        mean_lengths=(1, LL_PARAMS),
    ),
    Case(
        laplace.KronLLLaplace,
        "last_layer",
        "kron",
        [
            *LL_BASE,
            "last_layer_name",
            "damping",
            "backend_kwargs",
            "asdl_fisher_kwargs",
        ],
        required={"last_layer_name": "2"},
        n_layers=LL_LAYERS,
        n_params=LL_PARAMS,
        precision_lengths=(1, LL_LAYERS),
        mean_lengths=(1, LL_PARAMS),
    ),
    Case(
        laplace.DiagLLLaplace,
        "last_layer",
        "diag",
        [*LL_BASE, "last_layer_name", "backend_kwargs", "asdl_fisher_kwargs"],
        required={"last_layer_name": "2"},
        n_layers=LL_LAYERS,
        n_params=LL_PARAMS,
        precision_lengths=(1, LL_LAYERS, LL_PARAMS),
        mean_lengths=(1, LL_PARAMS),
    ),
    Case(
        laplace.FullSubnetLaplace,
        "subnetwork",
        "full",
        [*BASE[:4], "backend", "backend_kwargs", "asdl_fisher_kwargs"],
        required={"subnetwork_indices": SUBNET},
        n_params=len(SUBNET),
        precision_lengths=(1, len(SUBNET)),
        mean_lengths=(1, len(SUBNET)),
    ),
    Case(
        laplace.DiagSubnetLaplace,
        "subnetwork",
        "diag",
        [*BASE[:4], "backend", "backend_kwargs", "asdl_fisher_kwargs"],
        required={"subnetwork_indices": SUBNET},
        n_params=len(SUBNET),
        precision_lengths=(1, len(SUBNET)),
        mean_lengths=(1, len(SUBNET)),
    ),
    Case(
        laplace.FunctionalLaplace,
        "all",
        "gp",
        [*BASE, "backend", "backend_kwargs", "independent_outputs", "seed"],
        required={"n_subset": 4},
        precision_lengths=(1,),
    ),
    Case(
        laplace.FunctionalLLLaplace,
        "last_layer",
        "gp",
        [
            *LL_BASE[:-1],
            "last_layer_name",
            "backend",
            "backend_kwargs",
            "independent_outputs",
            "seed",
        ],
        required={"n_subset": 4, "last_layer_name": "2"},
        n_layers=LL_LAYERS,
        n_params=LL_PARAMS,
        precision_lengths=(1,),
        mean_lengths=(1, LL_PARAMS),
    ),
    Case(
        laplace.ELLA,
        "all",
        "gp",
        [*BASE, "backend", "backend_kwargs", "seed"],
        required={"subsample_size": 6, "n_eigenvalues": 3},
        factory={"functional_approximation": "nystrom"},
        precision_lengths=(1,),
        zero_mean_only=True,
    ),
    Case(
        laplace.VaLLA,
        "all",
        "gp",
        [*BASE, "backend", "backend_kwargs", "seed", "alpha", "mc_softmax_samples"],
        required={"inducing_locations": "random", "num_inducing": 3},
        factory={"functional_approximation": "variational"},
        precision_lengths=(1,),
        zero_mean_only=True,
    ),
]
# The first arguments after (model, likelihood) that are laplace-torch's
# required extras, in its positional order.
REQUIRED_ORDER = {
    laplace.FullSubnetLaplace: ["subnetwork_indices"],
    laplace.DiagSubnetLaplace: ["subnetwork_indices"],
    laplace.FunctionalLaplace: ["n_subset"],
    laplace.FunctionalLLLaplace: ["n_subset"],
    laplace.ELLA: ["subsample_size", "n_eigenvalues"],
    laplace.VaLLA: ["inducing_locations", "num_inducing", "inducing_classes"],
}
CASE_IDS = [c.name for c in CASES]
