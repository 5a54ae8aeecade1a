"""Golden files from laplace-torch 0.3 (tests/golden/laplace-torch-0.3, see its
README): for every likelihood x subset x structure case our numbers equal
laplace-torch's (marginal likelihood at two settings, GLM predictives,
posterior-precision diagonal, marglik-tuned prior), laplace-torch's state dict
loads into the matching class and predicts the same numbers, and our state dict
has the keys, types and shapes of laplace-torch's (so it loads there).

The sequence of calls per case is that of ``make_golden.py``: the predictives
and the saved state dict come after ``log_marginal_likelihood`` was evaluated at
the second setting (which keeps those hyperparameters).
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace

# tiny tensors: one thread avoids thread start-up on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "golden" / "laplace-torch-0.3"
META = json.loads((GOLDEN / "golden.json").read_text())
CASES = {rec["case"]: rec for rec in META["cases"]}
RTOL, RTOL_TUNED = 1e-6, 1e-4


@functools.cache
def _inputs() -> tuple[dict, dict]:
    data = torch.load(GOLDEN / "data.pt", weights_only=True)
    weights = torch.load(GOLDEN / "models.pt", weights_only=True)
    return data, weights


def _model(likelihood: str) -> nn.Module:
    n_out = 1 if likelihood == "regression" else 3
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, n_out)).double()
    model.load_state_dict(_inputs()[1][likelihood])
    return model


def _build(rec: dict) -> Any:
    kwargs = {}
    if "subnetwork_indices" in rec:
        kwargs["subnetwork_indices"] = torch.tensor(rec["subnetwork_indices"])
    return Laplace(
        _model(rec["likelihood"]),
        rec["likelihood"],
        subset_of_weights=rec["subset_of_weights"],
        hessian_structure=rec["hessian_structure"],
        sigma_noise=rec["sigma_noise"],
        prior_precision=rec["prior_precision"],
        **kwargs,
    )


def _loader(rec: dict) -> DataLoader:
    data = _inputs()[0]
    y = data["y_reg"] if rec["likelihood"] == "regression" else data["y_cls"]
    return DataLoader(TensorDataset(data["X"], y), batch_size=rec["batch_size"])


def _predictions(la: Any, rec: dict) -> dict[str, torch.Tensor]:
    X_test = _inputs()[0]["X_test"]
    if rec["likelihood"] == "regression":
        f_mu, f_var = la(X_test, pred_type="glm")
        return {"glm_f_mu": f_mu, "glm_f_var": f_var}
    return {
        f"glm_{link}": la(X_test, pred_type="glm", link_approx=link)
        for link in ("probit", "bridge")
    }


@functools.cache
def _run(name: str) -> dict[str, Any]:
    """Everything ``make_golden.py`` recorded for case ``name``, computed by us in
    the same order, and our state dict at the point laplace-torch saved its."""
    rec = CASES[name]
    la = _build(rec)
    la.fit(_loader(rec))
    out = {"log_marginal_likelihood": la.log_marginal_likelihood()}
    if rec["likelihood"] == "regression":
        out["lml_at_prior_2_sigma_0.5"] = la.log_marginal_likelihood(
            torch.tensor(2.0), torch.tensor(0.5)
        )
    else:
        out["lml_at_prior_2"] = la.log_marginal_likelihood(torch.tensor(2.0))
    out.update(_predictions(la, rec))
    P = la.posterior_precision
    P = P.to_matrix() if hasattr(P, "to_matrix") else P
    out["posterior_precision_diag"] = P.diagonal() if P.ndim == 2 else P
    out["state_dict"] = la.state_dict()
    la.optimize_prior_precision(method="marglik", n_steps=50, lr=0.1)
    out["marglik_prior_precision"] = la.prior_precision
    out["marglik_log_marginal_likelihood"] = la.log_marginal_likelihood()
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _fixture_state(name: str) -> dict[str, Any]:
    return torch.load(GOLDEN / name / "state_dict.pt", weights_only=True)


def _close(ours: torch.Tensor, golden: Any, rtol: float) -> None:
    expected = torch.as_tensor(golden, dtype=torch.float64).flatten()
    torch.testing.assert_close(
        ours.to(torch.float64).flatten(), expected, rtol=rtol, atol=0
    )


NUMBERS = [
    (name, key)
    for name, rec in CASES.items()
    for key in [
        "log_marginal_likelihood",
        "lml_at_prior_2_sigma_0.5"
        if rec["likelihood"] == "regression"
        else "lml_at_prior_2",
        *(
            ["glm_f_mu", "glm_f_var"]
            if rec["likelihood"] == "regression"
            else ["glm_probit", "glm_bridge"]
        ),
        "posterior_precision_diag",
        "marglik_prior_precision",
        "marglik_log_marginal_likelihood",
    ]
]


@pytest.mark.parametrize("name,key", NUMBERS, ids=[f"{n}-{k}" for n, k in NUMBERS])
def test_numbers_equal_laplace_torch(name, key):
    rtol = RTOL_TUNED if key.startswith("marglik") else RTOL
    _close(_run(name)[key], CASES[name][key], rtol)


@pytest.mark.parametrize("name", list(CASES))
def test_laplace_torch_state_dict_loads_and_predicts_the_same(name):
    rec = CASES[name]
    la = _build(rec)
    la.load_state_dict(_fixture_state(name))
    predictions = _predictions(la, rec)
    assert predictions  # one check per predictive
    for key, value in predictions.items():
        _close(value.detach(), rec[key], RTOL)
    # and saving it again gives laplace-torch's entries back
    ours, theirs = la.state_dict(), _fixture_state(name)
    for key in ("mean", "loss", "prior_mean", "prior_precision", "sigma_noise"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    torch.testing.assert_close(ours["H"], theirs["H"], rtol=0, atol=0)
    for key in ("n_data", "n_outputs", "likelihood", "temperature", "cls_name"):
        assert ours[key] == theirs[key]


def _layout(value: Any) -> Any:
    """Type and, for tensors, shape and dtype, recursively."""
    if isinstance(value, torch.Tensor):
        return ("Tensor", tuple(value.shape), value.dtype)
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_layout(v) for v in value])
    return type(value).__name__


@pytest.mark.parametrize("name", list(CASES))
def test_our_state_dict_has_laplace_torch_keys_types_and_shapes(name):
    ours, theirs = _run(name)["state_dict"], _fixture_state(name)
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert _layout(ours[key]) == _layout(value), key
    # and it passes the weights_only loader laplace-torch users rely on
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert {k: _layout(v) for k, v in loaded.items()} == {
        k: _layout(v) for k, v in ours.items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_our_state_dict_round_trips_through_a_fresh_object(name):
    rec = CASES[name]
    la = _build(rec)
    la.load_state_dict(_run(name)["state_dict"])
    for key, value in _predictions(la, rec).items():
        _close(value.detach(), rec[key], RTOL)
