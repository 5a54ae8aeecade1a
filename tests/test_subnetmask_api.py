"""SubnetMask API (issue 13.7), unknown last-layer names at construction, and
FeatureExtractor's feature_reduction over every middle dim (issue 13.9)."""

import pytest
import torch
from ground_truth import tiny_loader, tiny_net
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import laplace
from laplace import Laplace
from laplace.utils import (
    FeatureExtractor,
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    SubnetMask,
    UnknownKeyError,
)

P_ALL = 2 * 4 + 4 + 4 * 3 + 3  # tiny_net(3)


class EverySecond(SubnetMask):
    """A user mask that overrides only get_subnet_mask."""

    def get_subnet_mask(self, train_loader):
        mask = torch.zeros(P_ALL, dtype=torch.bool)
        mask[::2] = True
        return mask


def _masks(model):
    diag = laplace.DiagLaplace(model, "classification")
    return {
        "random": (RandomSubnetMask(model, 5), 5),
        "magnitude": (LargestMagnitudeSubnetMask(model, 4), 4),
        "diag": (LargestVarianceDiagLaplaceSubnetMask(model, 3, diag), 3),
        "param": (ParamNameSubnetMask(model, ["2.bias"]), None),
        "module": (ModuleNameSubnetMask(model, ["0"]), None),
        "last": (LastLayerSubnetMask(model, "2"), None),
        "last_auto": (LastLayerSubnetMask(model), None),
        "user": (EverySecond(model), None),
    }


MASKS = ["random", "magnitude", "diag", "param", "module", "last", "last_auto", "user"]
EXPECTED_K = {"param": 3, "module": 12, "last": 15, "last_auto": 15, "user": 14}


@pytest.mark.parametrize("name", MASKS)
def test_indices_and_n_params_subnet_lifecycle(name):
    model = tiny_net(3)
    mask, k_score = _masks(model)[name]
    assert not hasattr(mask, "indices")
    with pytest.raises(AttributeError, match="select"):
        mask.indices  # noqa: B018
    if k_score is None:  # known only after select()
        assert not hasattr(mask, "n_params_subnet")
    else:
        assert mask.n_params_subnet == k_score
    loader, _ = tiny_loader("classification", 3)
    indices = mask.select(loader)
    assert indices.dtype == torch.long and torch.equal(mask.indices, indices)
    expected = k_score if k_score is not None else EXPECTED_K[name]
    assert mask.n_params_subnet == len(indices) == expected
    with pytest.raises(ValueError, match="already selected"):
        mask.select(loader)
    assert torch.equal(mask.indices, indices)


def test_user_subclass_drives_subnet_laplace():
    model = tiny_net(3)
    mask = EverySecond(model)
    indices = mask.select()
    assert indices.tolist() == list(range(0, P_ALL, 2))
    la = laplace.FullSubnetLaplace(model, "classification", indices)
    assert la.n_params_subnet == mask.n_params_subnet == 14
    la.fit(tiny_loader("classification", 3)[0])
    assert la.sample(2).shape == (2, P_ALL)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: ParamNameSubnetMask(m, ["0.weight", "9.bias"]), "'9.bias'"),
        (lambda m: ModuleNameSubnetMask(m, ["7"]), "'7'"),
        (lambda m: LastLayerSubnetMask(m, "fc"), "'fc'"),
        (lambda m: FeatureExtractor(m, last_layer_name="fc"), "'fc'"),
    ],
)
def test_unknown_names_raise_key_and_value_error_at_construction(make, match):
    with pytest.raises(KeyError, match=match):
        make(tiny_net(3))
    with pytest.raises(ValueError, match=match) as info:
        make(tiny_net(3))
    assert isinstance(info.value, UnknownKeyError)
    assert not str(info.value).startswith('"')  # readable, not KeyError's repr


LL_CLASSES = [
    (laplace.FullLLLaplace, "full", {}),
    (laplace.KronLLLaplace, "kron", {}),
    (laplace.DiagLLLaplace, "diag", {}),
    (laplace.FunctionalLLLaplace, "gp", {"n_subset": 4}),
]


@pytest.mark.parametrize("via", ["class", "factory"])
@pytest.mark.parametrize("cls,structure,extra", LL_CLASSES)
def test_last_layer_laplace_rejects_unknown_last_layer_name(cls, structure, extra, via):
    model = tiny_net(3)
    with pytest.raises(UnknownKeyError, match="last_layer_name='fc'"):
        if via == "class":
            cls(model, "classification", last_layer_name="fc", **extra)
        else:
            Laplace(
                model, "classification", "last_layer", structure,
                last_layer_name="fc", **extra,
            )  # fmt: skip
    la = cls(model, "classification", last_layer_name="2", **extra)
    assert la.n_params == 15


# ---- feature_reduction -------------------------------------------------------------
REDUCE = {
    "pick_first": lambda h: h[:, 0, 0],
    "pick_last": lambda h: h[:, -1, -1],
    "average": lambda h: h.mean(dim=(1, 2)),
}


class MiddleDims(nn.Module):
    """Features ``(B, 3, 4, D)``, a linear head on every position, the output
    reduced the same way as ``reduction`` reduces the features."""

    def __init__(self, D, n_out, reduction):
        super().__init__()
        torch.manual_seed(0)
        self.D, self.reduce = D, REDUCE[reduction]
        self.enc = nn.Linear(2, 3 * 4 * D)
        self.head = nn.Linear(D, n_out)

    def features(self, x):
        return torch.tanh(self.enc(x)).reshape(len(x), 3, 4, self.D)

    def forward(self, x):
        return self.reduce(self.head(self.features(x)))


@pytest.mark.parametrize("reduction", list(REDUCE))
@pytest.mark.parametrize("B,D", [(5, 3), (1, 3), (4, 1), (1, 1)])
def test_feature_extractor_reduces_every_middle_dim(reduction, B, D):
    model = MiddleDims(D, 2, reduction).double()
    x = torch.randn(B, 2, dtype=torch.float64)
    fe = FeatureExtractor(model, feature_reduction=reduction)
    out, phi = fe.forward_with_features(x)
    expected = REDUCE[reduction](model.features(x))
    assert phi.shape == (B, D) and out.shape == (B, 2)
    torch.testing.assert_close(phi, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert fe.last_layer_name == "head"
    named = FeatureExtractor(model, "head", feature_reduction=reduction)
    torch.testing.assert_close(named.forward_with_features(x)[1], expected)


@pytest.mark.parametrize("via", ["class", "factory"])
@pytest.mark.parametrize("reduction", list(REDUCE))
def test_last_layer_laplace_with_feature_reduction_matches_dense_ggn(reduction, via):
    """Regression GGN of the head on the reduced features, from torch.func."""
    model = MiddleDims(3, 2, reduction).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    kwargs = dict(feature_reduction=reduction, prior_precision=0.5)
    if via == "class":
        la = laplace.FullLLLaplace(model, "regression", **kwargs)
    else:
        la = Laplace(model, "regression", "last_layer", "full", **kwargs)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=3))
    phi = REDUCE[reduction](model.features(X)).detach()
    params = {k: v.detach() for k, v in model.head.named_parameters()}
    J = jacrev(lambda p: functional_call(model.head, p, (phi,)))(params)
    J = torch.cat([j.reshape(7, 2, -1) for j in J.values()], -1)
    ggn = torch.einsum("bop,boq->pq", J, J)
    torch.testing.assert_close(la.H, ggn, rtol=1e-10, atol=1e-12)
    f_mu, f_var = la(X[:3])
    torch.testing.assert_close(f_mu, model(X[:3]).detach())
    cov = torch.linalg.inv(ggn + 0.5 * torch.eye(len(ggn)))
    expected = torch.einsum("bop,pq,brq->bor", J[:3], cov, J[:3])
    torch.testing.assert_close(f_var, expected, rtol=1e-8, atol=1e-12)
