"""Constructor signatures (issue 13.10): every class takes laplace-torch 0.3's
positional argument order, and every documented keyword has its effect through
the class and the ``Laplace`` factory; ``damping`` of KronLLLaplace is kept and
changes the decomposition as documented for Kron."""

import inspect

import pytest
import torch
from api_cases import CASE_IDS, CASES, REQUIRED_ORDER, SUBNET, tiny_model
from torch.utils.data import DataLoader, TensorDataset

import laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from laplace.utils.enums import FeatureReduction

GGN_ONLY = (laplace.FunctionalLaplace, laplace.FunctionalLLLaplace, laplace.ELLA)


def _value(case, name):
    """A non-default value of ``name`` for ``case`` and a check of its effect."""
    cls = case.cls
    backend = (
        CurvlinopsGGN
        if issubclass(cls, GGN_ONLY + (laplace.VaLLA,))
        else (CurvlinopsEF)
    )
    zero_mean = 0.0 if case.zero_mean_only else 0.1
    table = {
        "sigma_noise": (0.5, lambda la: float(la.sigma_noise) == 0.5),
        "prior_precision": (2.0, lambda la: la.prior_precision.tolist() == [2.0]),
        "prior_mean": (zero_mean, lambda la: float(la.prior_mean) == zero_mean),
        "temperature": (0.8, lambda la: la.temperature == 0.8),
        "enable_backprop": (True, lambda la: la.enable_backprop is True),
        "dict_key_x": ("x", lambda la: la.dict_key_x == "x"),
        "dict_key_y": ("y", lambda la: la.dict_key_y == "y"),
        "backend": (backend, lambda la: type(la.backend) is backend),
        "backend_kwargs": (
            {"kfac_approx": "reduce"},
            lambda la: la.backend.kfac_approx == "reduce",
        ),
        "asdl_fisher_kwargs": (
            None if issubclass(cls, laplace.LLLaplace | laplace.SubnetLaplace) else {},
            lambda la: la.asdl_fisher_kwargs in (None, {}),
        ),
        "damping": (True, lambda la: la.damping is True),
        "feature_reduction": (
            "pick_last",
            lambda la: la.model.feature_reduction is FeatureReduction.PICK_LAST,
        ),
        "last_layer_name": ("2", lambda la: la.model.last_layer_name == "2"),
        "independent_outputs": (True, lambda la: la.independent_outputs is True),
        "seed": (7, lambda la: la.seed == 7),
        "alpha": (0.5, lambda la: la.alpha == 0.5),
        "mc_softmax_samples": (3, lambda la: la.mc_softmax_samples == 3),
        "subnetwork_indices": (
            SUBNET,
            lambda la: torch.equal(la.subnetwork_indices, SUBNET),
        ),
        "n_subset": (4, lambda la: la.n_subset == 4),
        "subsample_size": (6, lambda la: la.subsample_size == 6),
        "n_eigenvalues": (3, lambda la: la.n_eigenvalues == 3),
        "inducing_locations": ("random", lambda la: la.inducing_locations == "random"),
        "num_inducing": (3, lambda la: la.num_inducing == 3),
        "inducing_classes": (None, lambda la: True),
    }
    return table[name]


def _positional(case):
    return [*REQUIRED_ORDER.get(case.cls, []), *case.signature]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_signature_order_matches_laplace_torch(case):
    params = list(inspect.signature(case.cls).parameters)
    assert params[:2] == ["model", "likelihood"]
    expected = _positional(case)
    assert params[2 : 2 + len(expected)] == expected


@pytest.mark.parametrize("via", ["class", "factory"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_all_arguments_positionally(case, via):
    names = _positional(case)
    args = [_value(case, name)[0] for name in names]
    model = tiny_model()
    if via == "class":
        la = case.cls(model, "regression", *args)
    else:
        la = laplace.Laplace(
            model, "regression", case.subset, case.structure, *args, **case.factory
        )
    assert type(la) is case.cls
    for name in names:
        assert _value(case, name)[1](la), name


@pytest.mark.parametrize("via", ["class", "factory"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_keyword(case, via):
    names = _positional(case)
    required = {n: _value(case, n)[0] for n in REQUIRED_ORDER.get(case.cls, [])}
    for name in names:
        if name in required:
            continue
        kwargs = {**required, name: _value(case, name)[0]}
        la = case.build(via, **kwargs)
        assert _value(case, name)[1](la), name
    with pytest.raises(TypeError):
        case.build(via, not_an_argument=1)


# ---- damping ---------------------------------------------------------------------
def _fit_kron_ll(via, damping, positional=False):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(2, (20,), generator=gen)
    kwargs = dict(prior_precision=torch.tensor([0.7, 1.3]), damping=damping)
    if positional:
        # model, likelihood, sigma_noise, prior_precision, prior_mean, temperature,
        # enable_backprop, feature_reduction, dict_key_x, dict_key_y, backend,
        # last_layer_name, damping
        la = laplace.KronLLLaplace(
            model, "classification", 1.0, kwargs["prior_precision"], 0.0, 1.0,
            False, None, "input_ids", "labels", None, None, damping,
        )  # fmt: skip
    elif via == "class":
        la = laplace.KronLLLaplace(model, "classification", **kwargs)
    else:
        la = laplace.Laplace(model, "classification", "last_layer", "kron", **kwargs)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=8))
    return la


@pytest.mark.parametrize("via", ["class", "factory", "positional"])
def test_kron_last_layer_damping_is_kept_and_used(via):
    damped = _fit_kron_ll(via, True, positional=via == "positional")
    plain = _fit_kron_ll(via, False, positional=via == "positional")
    assert damped.damping is True and plain.damping is False
    assert damped.H.damping is True
    # same curvature factors, prior added per factor (sqrt(delta) each) vs to
    # the product, as documented for KronDecomposed
    (G, A), (Gb,) = [[f.clone() for f in block] for block in damped.H_facs.kfacs]
    for F, H in zip([G, A, Gb], [f for b in plain.H_facs.kfacs for f in b]):
        torch.testing.assert_close(F, H, rtol=0, atol=0)
    deltas = damped.prior_precision
    eye = lambda n: torch.eye(n, dtype=G.dtype)  # noqa: E731
    root = deltas[0].sqrt()
    expected_damped = torch.block_diag(
        torch.kron(G + root * eye(len(G)), A + root * eye(len(A))),
        Gb + deltas[1] * eye(len(Gb)),
    )
    expected_plain = torch.block_diag(
        torch.kron(G, A) + deltas[0] * eye(len(G) * len(A)),
        Gb + deltas[1] * eye(len(Gb)),
    )
    torch.testing.assert_close(
        damped.posterior_precision.to_matrix(), expected_damped, rtol=1e-9, atol=1e-10
    )
    torch.testing.assert_close(
        plain.posterior_precision.to_matrix(), expected_plain, rtol=1e-9, atol=1e-10
    )
    assert (expected_damped - expected_plain).abs().max() > 1e-2
    torch.testing.assert_close(
        damped.log_det_posterior_precision,
        torch.logdet(expected_damped),
        rtol=1e-9,
        atol=0,
    )
