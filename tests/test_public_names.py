"""Public names of laplace-torch 0.3 (issue 13.12): module paths and their
exports, BaseLaplace's methods, ``prior_precision_diag`` and
``is_subset_params``."""

import subprocess
import sys
import textwrap

import pytest
import torch
from api_cases import CASE_IDS, CASES, tiny_model

import laplace
from laplace import BaseLaplace


def test_baselaplace_exports_every_weight_and_function_space_class():
    from laplace import baselaplace

    for name in [
        "BaseLaplace",
        "ParametricLaplace",
        "FullLaplace",
        "KronLaplace",
        "DiagLaplace",
        "LowRankLaplace",
        "FunctionalLaplace",
        "ELLA",
        "VaLLA",
    ]:
        assert getattr(baselaplace, name) is getattr(laplace, name)
        assert name in baselaplace.__all__


def test_utils_utils_exports():
    from laplace.utils import utils

    names = [
        "kron",
        "symeig",
        "block_diag",
        "diagonal_add_scalar",
        "invsqrt_precision",
        "validate",
        "SoDSampler",
    ]
    assert set(names) <= set(utils.__all__)
    for name in utils.__all__:
        assert hasattr(utils, name), name
    assert utils.symeig is laplace.utils.symeig
    assert utils.validate is laplace.utils.validate


_FRESH = textwrap.dedent(
    """
    import sys
    import laplace
    assert laplace.baselaplace.BaseLaplace is laplace.BaseLaplace
    assert laplace.lllaplace.KronLLLaplace is laplace.KronLLLaplace
    assert laplace.laplace.Laplace is laplace.Laplace
    import laplace.curvature
    for name in ("backpack", "asdl", "asdfghjkl"):
        assert f"laplace.curvature.{name}" not in sys.modules, name  # lazy
        module = getattr(laplace.curvature, name)
        assert module is sys.modules[f"laplace.curvature.{name}"]
        assert name in dir(laplace.curvature)
    assert laplace.curvature.backpack.BackPackGGN is laplace.curvature.BackPackGGN
    assert laplace.curvature.asdl.AsdlGGN is laplace.curvature.AsdlGGN
    print("ok")
    """
)


def test_module_attributes_in_a_fresh_interpreter():
    out = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_base_laplace_methods_raise_not_implemented():
    la = BaseLaplace(torch.nn.Linear(2, 1), "regression")
    x = torch.randn(3, 2)
    calls = {
        "fit": lambda: la.fit([(x, x[:, :1])]),
        "__call__": lambda: la(x),
        "log_marginal_likelihood": lambda: la.log_marginal_likelihood(),
        "sample": lambda: la.sample(2),
        "functional_samples": lambda: la.functional_samples(x),
    }
    for name, call in calls.items():
        assert hasattr(BaseLaplace, name)
        with pytest.raises(NotImplementedError):
            call()
    assert la.prior_precision_diag.shape == (3,)
    assert la.is_subset_params is False


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_is_subset_params_and_prior_precision_diag(case):
    la = case.build("class")
    assert la.is_subset_params is False
    diag = la.prior_precision_diag
    assert diag.shape == (case.n_params,) and bool((diag == 1).all())
    la.prior_precision = 0.3
    assert torch.allclose(la.prior_precision_diag, torch.full_like(diag, 0.3))
    model = tiny_model()
    next(model.parameters()).requires_grad_(False)  # 12 of 26 parameters frozen
    required = dict(case.required)
    if "subnetwork_indices" in required:
        required["subnetwork_indices"] = torch.tensor([0, 13])
    assert case.cls(model, "regression", **required).is_subset_params is True


@pytest.mark.parametrize("cls", [laplace.FunctionalLaplace, laplace.ELLA])
def test_function_space_sample_is_not_implemented(cls):
    case = next(c for c in CASES if c.cls is cls)
    la = case.build("class")
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample(3)
