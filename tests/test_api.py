"""Public API contract: factory routing, argument validation, serialization,
dict-like batches, frozen parameters, the user's model left untouched."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace
from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    FullLaplace,
    FullLLLaplace,
    KronLaplace,
    KronLLLaplace,
    Laplace,
    NotFittedError,
)
from laplace.utils import RunningNLLMetric


def net(n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, n_out)).double()


def cls_loader(n=30, n_out=3, batch_size=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(n_out, (n,), generator=gen)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def reg_loader(n=30, n_out=2, batch_size=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, n_out, generator=gen, dtype=torch.float64)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


ROUTES = {
    ("all", "full"): FullLaplace,
    ("all", "kron"): KronLaplace,
    ("all", "diag"): DiagLaplace,
    ("last_layer", "full"): FullLLLaplace,
    ("last_layer", "kron"): KronLLLaplace,
    ("last_layer", "diag"): DiagLLLaplace,
}


@pytest.mark.parametrize("key,cls", ROUTES.items())
def test_factory_routes(key, cls):
    la = Laplace(net(), "classification", *key)
    assert type(la) is cls
    assert isinstance(la, laplace.ParametricLaplace)


def test_factory_defaults_to_last_layer_kron():
    assert type(Laplace(net(), "classification")) is KronLLLaplace


def test_reexported_import_paths():
    from laplace.baselaplace import BaseLaplace, FullLaplace  # noqa: F401
    from laplace.curvature import CurvlinopsGGN  # noqa: F401
    from laplace.laplace import Laplace as L2
    from laplace.lllaplace import KronLLLaplace as K2
    from laplace.utils import FeatureExtractor, Kron, KronDecomposed  # noqa: F401

    assert L2 is Laplace and K2 is KronLLLaplace


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(likelihood="regresion"), "likelihood='regresion'"),
        (dict(subset_of_weights="some"), "subset_of_weights='some'"),
        (dict(hessian_structure="dense"), "hessian_structure='dense'"),
        (dict(subset_of_weights="subnetwork", hessian_structure="kron"), "subnetwork"),
        (dict(likelihood="classification", sigma_noise=2.0), "sigma_noise"),
        (dict(prior_precision=-1.0), "positive"),
        (dict(prior_precision=float("nan")), "positive and finite"),
        (dict(prior_precision=torch.ones(5)), "length 5"),
        (dict(temperature=0.0), "temperature"),
        (dict(sigma_noise=0.0, likelihood="regression"), "sigma_noise"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = dict(
        likelihood="classification", subset_of_weights="all", hessian_structure="full"
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Laplace(net(), **args)


def test_kron_rejects_per_parameter_prior():
    model = net()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(
        ValueError, match="KronLaplace accepts length 1 \\(scalar\\) or 4"
    ):
        KronLaplace(model, "classification", prior_precision=torch.ones(n))


@pytest.mark.parametrize("key", list(ROUTES))
def test_predict_before_fit_raises(key):
    la = Laplace(net(), "classification", *key)
    with pytest.raises(NotFittedError, match="fit"):
        la(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError):  # NotFittedError is also a ValueError
        la.log_marginal_likelihood()


def test_bad_predict_arguments():
    la = Laplace(net(), "classification", "all", "diag")
    la.fit(cls_loader())
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="pred_type='gp'"):
        la(x, pred_type="gp")
    with pytest.raises(ValueError, match="link_approx='mc'"):
        la(x, pred_type="nn", link_approx="probit")
    with pytest.raises(ValueError, match="link_approx='foo'"):
        la(x, link_approx="foo")
    with pytest.raises(ValueError, match="n_samples"):
        la(x, link_approx="mc", n_samples=0)
    with pytest.raises(ValueError, match="generator"):
        la(x, generator=3)
    with pytest.raises(ValueError, match="joint"):
        la(x, joint=True)


def test_bad_data():
    la = Laplace(net(), "classification", "all", "diag")
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()))
    with pytest.raises(ValueError, match="empty"):
        la.fit(empty)
    with pytest.raises(ValueError, match="dataset"):
        la.fit([(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))])
    X = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        la.fit(DataLoader(TensorDataset(X, torch.tensor([0, 1, 2, 3, 0, 1]))))
    X_nan = X.clone()
    X_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite|NaN"):
        la.fit(DataLoader(TensorDataset(X_nan, torch.tensor([0, 1, 2, 0, 0, 1]))))
    la_reg = Laplace(net(2), "regression", "all", "diag")
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        la_reg.fit(DataLoader(TensorDataset(X, torch.randn(6, 3, dtype=torch.float64))))


@pytest.mark.parametrize("key", list(ROUTES))
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_state_dict_round_trip_weights_only(key, likelihood, tmp_path):
    model = net(3 if likelihood == "classification" else 2)
    loader = cls_loader() if likelihood == "classification" else reg_loader()
    la = Laplace(model, likelihood, *key, prior_precision=0.7)
    la.fit(loader)
    path = tmp_path / "la.pt"
    torch.save(la.state_dict(), path)
    state = torch.load(path, weights_only=True)
    la2 = Laplace(model, likelihood, *key)
    la2.load_state_dict(state)
    x = torch.randn(5, 4, dtype=torch.float64)
    out1, out2 = la(x), la2(x)
    if likelihood == "regression":
        torch.testing.assert_close(out1[1], out2[1], rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(out1, out2, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), la2.log_marginal_likelihood(), rtol=1e-12, atol=0
    )


def test_load_state_dict_from_other_model_or_class():
    la = Laplace(net(), "classification", "all", "diag")
    la.fit(cls_loader())
    state = la.state_dict()
    with pytest.raises(ValueError, match="DiagLaplace"):
        Laplace(net(), "classification", "all", "full").load_state_dict(state)
    with pytest.raises(ValueError, match="likelihood"):
        Laplace(net(3), "regression", "all", "diag").load_state_dict(state)
    bigger = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="another model"):
        Laplace(bigger, "classification", "all", "diag").load_state_dict(state)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, batch):
        return self.body(batch["input_ids"])


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"input_ids": self.X[i], "labels": self.y[i]}


@pytest.mark.parametrize("key", list(ROUTES))
def test_dict_like_batches_equal_tuple_batches(key):
    loader = cls_loader()
    X, y = loader.dataset.tensors
    model = DictModel()
    la_dict = Laplace(model, "classification", *key)
    la_dict.fit(DataLoader(DictDataset(X, y), batch_size=10))
    la_tuple = Laplace(model.body, "classification", *key)
    la_tuple.fit(loader)
    torch.testing.assert_close(
        la_dict.log_marginal_likelihood(),
        la_tuple.log_marginal_likelihood(),
        rtol=1e-10,
        atol=0,
    )
    probs = la_dict({"input_ids": X[:4]})
    torch.testing.assert_close(probs, la_tuple(X[:4]), rtol=1e-10, atol=0)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_only_trainable_parameters_are_treated(structure):
    model = net()
    model[0].weight.requires_grad_(False)
    la = Laplace(model, "classification", "all", structure)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert la.n_params == n_trainable
    la.fit(cls_loader())
    assert la.sample(3).shape == (3, n_trainable)
    assert not model[0].weight.requires_grad


def test_model_mode_and_parameters_untouched():
    model = net()
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    for key in ROUTES:
        la = Laplace(model, "classification", *key)
        la.fit(cls_loader())
        la(
            torch.randn(2, 4, dtype=torch.float64),
            pred_type="nn",
            link_approx="mc",
            n_samples=3,
        )
        la.optimize_prior_precision(n_steps=3)
    assert model.training and all(m.training for m in model.modules())
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(b, p.detach(), rtol=0, atol=0)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_gridsearch_picks_the_best_grid_point():
    loader = cls_loader(n=40)
    la = Laplace(net(), "classification", "last_layer", "diag")
    la.fit(loader)
    val = cls_loader(n=20, seed=4)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        grid_size=7,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
    )
    chosen = la.prior_precision.clone()
    scores = {}
    for p in torch.logspace(-2, 2, 7):
        la.prior_precision = p
        metric = RunningNLLMetric()
        for X, y in val:
            metric.update(la(X), y)
        scores[float(p)] = float(metric.compute())
    best = min(scores, key=scores.get)
    torch.testing.assert_close(chosen, torch.tensor([best]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method='grid'"):
        la.optimize_prior_precision(method="grid")


@pytest.mark.parametrize("structure", ["scalar", "layerwise", "diag"])
def test_marglik_prior_structures_increase_marglik(structure):
    la = Laplace(net(), "classification", "all", "full")
    la.fit(cls_loader())
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik", prior_structure=structure, n_steps=50)
    expected_len = {"scalar": 1, "layerwise": 4, "diag": la.n_params}[structure]
    assert la.prior_precision.shape == (expected_len,)
    assert la.log_marginal_likelihood().item() > before


def test_float32_model_gives_float32_outputs():
    model = net().float()
    X, y = cls_loader().dataset.tensors
    la = Laplace(model, "classification", "all", "kron")
    la.fit(DataLoader(TensorDataset(X.float(), y), batch_size=10))
    probs = la(X[:3].float())
    assert probs.dtype == torch.float32
    assert la.log_marginal_likelihood().dtype == torch.float32


def test_enable_backprop_gives_input_gradients():
    model = net(1)
    la = Laplace(model, "regression", "last_layer", "kron", enable_backprop=True)
    la.fit(reg_loader(n_out=1))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    f_mu, f_var = la(x)
    (f_mu.sum() + f_var.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
