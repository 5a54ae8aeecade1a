"""Subnetwork Laplace against Full/Diag(LL)Laplace and dense torch.func ground
truth in float64; subnetwork masks and diagonal SWAG."""

import io
import math
from copy import deepcopy

import pytest
import torch
from ground_truth import dense_ggn, dense_jacobians, tiny_loader, tiny_net
from torch import nn

from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    FullLaplace,
    FullLLLaplace,
    Laplace,
)
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace
from laplace.utils.subnetmask import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
)
from laplace.utils.swag import fit_diagonal_swag_var

RTOL = 1e-7
P_ALL, P_LL = 27, 15  # 2 -> 4 -> 3: [8, 4, 12, 3]


SUBNET = {"full": FullSubnetLaplace, "diag": DiagSubnetLaplace}
X_TEST = torch.randn(
    5, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64
)


def assert_same_posterior(sub, ref, likelihood, rtol=RTOL):
    torch.testing.assert_close(
        sub.posterior_precision, ref.posterior_precision, rtol=rtol, atol=1e-12
    )
    torch.testing.assert_close(
        sub.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=rtol, atol=0
    )
    if likelihood == "regression":
        for a, b in zip(sub(X_TEST), ref(X_TEST)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)
    else:
        torch.testing.assert_close(sub(X_TEST), ref(X_TEST), rtol=rtol, atol=0)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_all_indices_equal_full_and_diag_laplace(structure, likelihood):
    model = tiny_net(3)
    dl, _ = tiny_loader(likelihood, 3)
    kwargs = {"prior_precision": 0.6, "temperature": 0.8}
    if likelihood == "regression":
        kwargs["sigma_noise"] = 0.7
    sub = Laplace(
        model,
        likelihood,
        subset_of_weights="subnetwork",
        hessian_structure=structure,
        subnetwork_indices=torch.arange(P_ALL),
        **kwargs,
    )
    assert isinstance(sub, SUBNET[structure])
    ref = (FullLaplace if structure == "full" else DiagLaplace)(
        model, likelihood, **kwargs
    )
    sub.fit(dl)
    ref.fit(dl)
    assert_same_posterior(sub, ref, likelihood)
    s1 = sub.sample(4, generator=torch.Generator().manual_seed(2))
    s2 = ref.sample(4, generator=torch.Generator().manual_seed(2))
    # same draws; only float round-off differs between the two code paths
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-13)
    nn1 = sub(
        X_TEST,
        pred_type="nn",
        link_approx="mc",
        n_samples=8,
        generator=torch.Generator().manual_seed(3),
    )
    nn2 = ref(
        X_TEST,
        pred_type="nn",
        link_approx="mc",
        n_samples=8,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(nn1, nn2, rtol=RTOL, atol=0)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_last_layer_indices_equal_last_layer_laplace(structure, likelihood):
    model = tiny_net(3)
    dl, _ = tiny_loader(likelihood, 3)
    indices = torch.arange(P_ALL - P_LL, P_ALL)
    sub = SUBNET[structure](model, likelihood, indices, prior_precision=1.3)
    ref = (FullLLLaplace if structure == "full" else DiagLLLaplace)(
        model, likelihood, prior_precision=1.3
    )
    sub.fit(dl)
    ref.fit(dl)
    assert_same_posterior(sub, ref, likelihood)


def test_random_subset_against_dense_ground_truth():
    model = tiny_net(3)
    dl, X = tiny_loader("classification", 3)
    idx = torch.tensor([20, 3, 11, 0, 26, 7, 15])  # unsorted on purpose
    prior = torch.linspace(0.5, 2.0, len(idx))
    la = FullSubnetLaplace(model, "classification", idx, prior_precision=prior)
    la.fit(dl)
    P = dense_ggn(model, X, "classification")[idx][:, idx] + torch.diag(prior)
    torch.testing.assert_close(la.posterior_precision, P, rtol=RTOL, atol=1e-12)
    map_full = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(la.mean, map_full, rtol=0, atol=0)
    torch.testing.assert_close(la.mean_subnet, map_full[idx], rtol=0, atol=0)
    scatter = map_full[idx] @ (prior * map_full[idx])
    torch.testing.assert_close(la.scatter, scatter, rtol=RTOL, atol=0)
    J = dense_jacobians(model, X_TEST)[..., idx]
    f_var = J @ torch.linalg.solve(P, J.mT)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(
        la(X_TEST), torch.softmax(kappa * model(X_TEST), -1), rtol=RTOL, atol=0
    )
    # samples: the other entries fixed at the MAP, the subnetwork ~ N(MAP, P^-1)
    n = 100000
    samples = la.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, P_ALL)
    others = torch.ones(P_ALL, dtype=torch.bool)
    others[idx] = False
    assert (samples[:, others] == map_full[others]).all()
    cov = torch.linalg.inv(P)
    # Monte Carlo: std error of a covariance entry ~ sqrt(2/n) * var; 5 std errors
    torch.testing.assert_close(
        torch.cov(samples[:, idx].T),
        cov,
        rtol=0,
        atol=5 * math.sqrt(2 / n) * cov.diagonal().max().item(),
    )
    delta = samples[0] - map_full
    torch.testing.assert_close(
        la.log_prob(samples[0]),
        -0.5 * delta[idx] @ P @ delta[idx]
        + 0.5 * (torch.linalg.slogdet(P)[1] - len(idx) * math.log(2 * math.pi)),
        rtol=RTOL,
        atol=0,
    )


def test_ef_backend_and_frozen_parameters():
    model = tiny_net(3)
    model[0].weight.requires_grad_(False)  # treated vector: [4, 12, 3]
    dl, _ = tiny_loader("classification", 3)
    idx = torch.tensor([1, 5, 18, 2])
    la = FullSubnetLaplace(model, "classification", idx, backend=CurvlinopsEF)
    ref = FullLaplace(model, "classification", backend=CurvlinopsEF)
    la.fit(dl)
    ref.fit(dl)
    torch.testing.assert_close(
        la.posterior_precision,
        ref.posterior_precision[idx][:, idx],
        rtol=RTOL,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match=r"\[0, 19\)"):
        FullSubnetLaplace(model, "classification", torch.tensor([19]))


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([0, P_ALL]), "lie in"),
        (torch.tensor([-1, 2]), "lie in"),
        (torch.tensor([1, 4, 1]), "duplicates"),
        (torch.tensor([0.0, 1.0]), "integer dtype"),
        (torch.tensor([True, False]), "integer dtype"),
        (torch.tensor([], dtype=torch.long), "empty"),
        (torch.tensor([[0, 1]]), "1-d"),
        ([0, 1], "LongTensor"),
    ],
)
def test_invalid_indices(bad, match):
    with pytest.raises(ValueError, match=match):
        FullSubnetLaplace(tiny_net(3), "classification", bad)


def test_invalid_arguments_and_state_dict():
    model = tiny_net(3)
    idx = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match="GGN and empirical Fisher"):
        FullSubnetLaplace(model, "classification", idx, backend=CurvlinopsHessian)
    with pytest.raises(ValueError, match="asdl_fisher_kwargs"):
        DiagSubnetLaplace(model, "classification", idx, asdl_fisher_kwargs={})
    with pytest.raises(ValueError, match="prior_precision has length 4"):
        FullSubnetLaplace(model, "classification", idx, prior_precision=torch.ones(4))
    with pytest.raises(ValueError, match="prior_mean has length 2"):
        FullSubnetLaplace(model, "classification", idx, prior_mean=torch.ones(2))
    with pytest.raises(ValueError, match="subnetwork"):
        Laplace(
            model,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="kron",
            subnetwork_indices=idx,
        )
    dl, _ = tiny_loader("classification", 3)
    la = FullSubnetLaplace(model, "classification", idx, backend=CurvlinopsGGN)
    la.fit(dl)
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = FullSubnetLaplace(model, "classification", idx)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(X_TEST), la(X_TEST), rtol=0, atol=0)
    with pytest.raises(ValueError, match="subnetwork_indices"):
        FullSubnetLaplace(model, "classification", idx + 1).load_state_dict(state)


# ---- masks ---------------------------------------------------------------------------
def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_largest_magnitude_and_random_masks():
    model = tiny_net(3)
    k = 6
    idx = LargestMagnitudeSubnetMask(model, k).select()
    assert idx.dtype == torch.long
    assert set(idx.tolist()) == set(flat(model).abs().topk(k).indices.tolist())
    mask = RandomSubnetMask(model, k, generator=torch.Generator().manual_seed(0))
    r1 = mask.select()
    r2 = RandomSubnetMask(model, k, generator=torch.Generator().manual_seed(0)).select()
    r3 = RandomSubnetMask(model, k, generator=torch.Generator().manual_seed(1)).select()
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert len(set(r1.tolist())) == k and 0 <= r1.min() and r1.max() < P_ALL
    assert torch.equal(mask.indices, r1)
    for bad in (0, P_ALL + 1, 2.0, True):
        with pytest.raises(ValueError, match="n_params_subnet"):
            RandomSubnetMask(model, bad)
    with pytest.raises(AttributeError, match="select"):
        LargestMagnitudeSubnetMask(model, 2).indices  # noqa: B018
    m = LargestMagnitudeSubnetMask(model, 2)
    bool_mask = torch.zeros(P_ALL, dtype=torch.bool)
    bool_mask[[3, 8]] = True
    assert m.convert_subnet_mask_to_indices(bool_mask).tolist() == [3, 8]
    assert m.convert_subnet_mask_to_indices(bool_mask.double()).tolist() == [3, 8]
    for bad in (torch.zeros(P_ALL), torch.ones(5), torch.full((P_ALL,), 2.0)):
        with pytest.raises(ValueError, match="subnet_mask"):
            m.convert_subnet_mask_to_indices(bad)


def test_name_masks_select_exactly_those_parameters():
    model = tiny_net(3)
    # layout: 0.weight [0, 8), 0.bias [8, 12), 2.weight [12, 24), 2.bias [24, 27)
    idx = ParamNameSubnetMask(model, ["2.bias", "0.weight"]).select()
    assert idx.tolist() == list(range(8)) + [24, 25, 26]
    assert ModuleNameSubnetMask(model, ["0"]).select().tolist() == list(range(12))
    assert ModuleNameSubnetMask(model, ["", "2"]).select().tolist() == list(range(27))
    last = list(range(P_ALL - P_LL, P_ALL))
    assert LastLayerSubnetMask(model, "2").select().tolist() == last
    dl, _ = tiny_loader("classification", 3)
    before = deepcopy(model.state_dict())
    model.train()
    assert LastLayerSubnetMask(model).select(dl).tolist() == last
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match="train_loader"):
        LastLayerSubnetMask(model).select()
    with pytest.raises(ValueError, match="'3.weight'"):
        ParamNameSubnetMask(model, ["3.weight"]).select()
    with pytest.raises(ValueError, match="'5'"):
        ModuleNameSubnetMask(model, ["5"]).select()
    with pytest.raises(ValueError, match="no trainable"):
        ModuleNameSubnetMask(model, ["1"]).select()  # Tanh
    with pytest.raises(ValueError, match="non-empty list"):
        ParamNameSubnetMask(model, "0.weight")
    model[0].bias.requires_grad_(False)  # treated vector: [8, 12, 3]
    assert ModuleNameSubnetMask(model, ["2"]).select().tolist() == list(range(8, 23))
    with pytest.raises(ValueError, match="requires_grad=False"):
        ParamNameSubnetMask(model, ["0.bias"]).select()


def test_largest_variance_diag_laplace_mask():
    model = tiny_net(3)
    dl, _ = tiny_loader("classification", 3)
    diag = DiagLaplace(model, "classification", prior_precision=0.5)
    idx = LargestVarianceDiagLaplaceSubnetMask(model, 5, diag).select(dl)
    assert diag.is_fitted
    assert set(idx.tolist()) == set(diag.posterior_variance.topk(5).indices.tolist())
    with pytest.raises(ValueError, match="DiagLaplace"):
        LargestVarianceDiagLaplaceSubnetMask(
            model, 5, FullLaplace(model, "classification")
        )
    with pytest.raises(ValueError, match="train_loader"):
        LargestVarianceDiagLaplaceSubnetMask(
            model, 5, DiagLaplace(model, "classification")
        ).select()


def reference_swag(model, dl, n_snapshots, freq, lr, momentum, wd):
    """Independent SWAG loop: SGD epochs, snapshot every `freq` epochs."""
    copy = deepcopy(model).train()
    opt = torch.optim.SGD(copy.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    snaps = []
    for epoch in range(n_snapshots * freq):
        for X, y in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(copy(X), y).backward()
            opt.step()
        if (epoch + 1) % freq == 0:
            snaps.append(flat(copy))
    return torch.stack(snaps).var(0, unbiased=False)


def test_fit_diagonal_swag_var():
    model = tiny_net(3)
    model.eval()
    dl, _ = tiny_loader("classification", 3)
    before = deepcopy(model.state_dict())
    var = fit_diagonal_swag_var(
        model, dl, nn.CrossEntropyLoss(), n_snapshots_total=4, snapshot_freq=2, lr=0.1
    )
    assert var.shape == (P_ALL,) and (var > 0).all()
    ref = reference_swag(model, dl, 4, 2, 0.1, 0.9, 3e-4)
    torch.testing.assert_close(var, ref.clamp_min(1e-30), rtol=1e-6, atol=1e-14)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    # no movement: all snapshots coincide, variances hit the floor
    still = fit_diagonal_swag_var(
        model, dl, nn.CrossEntropyLoss(), n_snapshots_total=3, lr=0.0, min_var=1e-9
    )
    torch.testing.assert_close(still, torch.full((P_ALL,), 1e-9), rtol=0, atol=0)
    for kwargs in ({"n_snapshots_total": 0}, {"snapshot_freq": 1.5}, {"lr": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            fit_diagonal_swag_var(model, dl, nn.CrossEntropyLoss(), **kwargs)
    mask = LargestVarianceSWAGSubnetMask(
        model, 4, swag_n_snapshots=4, swag_snapshot_freq=2, swag_lr=0.1
    )
    idx = mask.select(dl)
    assert set(idx.tolist()) == set(ref.topk(4).indices.tolist())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
