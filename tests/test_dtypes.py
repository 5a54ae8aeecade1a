"""Outputs follow the model's dtype for every class: ``H`` and
``posterior_precision`` as exposed, ``log_marginal_likelihood()``, GLM/GP
moments, probabilities and samples come back in float16/bfloat16/float32/float64
as the model is (half-precision models compute in float32 inside). Values of
half-precision models are checked against a float32 copy of the same model."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, Laplace, VaLLA
from laplace.utils.matrix import Kron, KronDecomposed

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECS = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
    ("subnetwork", "full"),
    ("subnetwork", "diag"),
    ("all", "lowrank"),
    ("all", "gp"),
    ("last_layer", "gp"),
    ("ella", None),
    ("valla", None),
]
# half-precision forward passes against a float32 copy of the model
RTOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def model_and_data(likelihood: str):
    torch.manual_seed(0)
    n_out = 2 if likelihood == "regression" else 3
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, n_out))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=gen)
    if likelihood == "regression":
        y = torch.randn(16, n_out, generator=gen)
    else:
        y = torch.randint(n_out, (16,), generator=gen)
    return model, X, y


def build(model, likelihood, subset, structure):
    if subset == "ella":
        return ELLA(model, likelihood, subsample_size=5, n_eigenvalues=3)
    if subset == "valla":
        return VaLLA(model, likelihood, "random", num_inducing=3)
    kwargs = {}
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 38, 3)
    if structure == "gp":
        kwargs["n_subset"] = 6
    if structure == "lowrank":
        kwargs["backend_kwargs"] = {"low_rank": 3}
    return Laplace(model, likelihood, subset, structure, **kwargs)


def fit(la, X, y):
    loader = DataLoader(TensorDataset(X, y), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank warnings of the tiny Nystrom basis
        if isinstance(la, VaLLA):
            la.fit(loader, iterations=1)
        else:
            la.fit(loader)
    return la


def floating(value):
    """The floating-point tensors in ``value`` (tensors, Kron objects, tuples)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, Kron):
        return [F for block in value.kfacs for F in block]
    if isinstance(value, KronDecomposed):
        return [t for ts in (*value.eigenvalues, *value.eigenvectors) for t in ts]
    if isinstance(value, tuple | list):
        return [t for v in value for t in floating(v)]
    return []


def close(a, b, dtype):
    if dtype in RTOL:
        scale = b.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(
            a.float(), b.float(), rtol=RTOL[dtype], atol=RTOL[dtype] * float(scale)
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("likelihood", ["regression", "classification"])
@pytest.mark.parametrize("subset,structure", SPECS)
def test_outputs_follow_the_model_dtype(subset, structure, likelihood, dtype):
    model, X, y = model_and_data(likelihood)
    X_half = X.to(dtype)
    y_half = y.to(dtype) if likelihood == "regression" else y
    la = fit(build(model.to(dtype), likelihood, subset, structure), X_half, y_half)
    ref = None
    if dtype in RTOL:
        twin = copy.deepcopy(model).float()  # the rounded weights, in float32
        ref = fit(build(twin, likelihood, subset, structure), X_half.float(), y)
    functional = subset in ("ella", "valla") or structure == "gp"
    pred_type = "gp" if functional else "glm"
    x = X_half[:4]
    out = la(x, pred_type=pred_type)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(t.dtype == dtype for t in outs)
    if ref is not None:
        ref_out = ref(x.float(), pred_type=pred_type)
        for a, b in zip(outs, ref_out if isinstance(ref_out, tuple) else (ref_out,)):
            close(a, b, dtype)
    if likelihood == "classification":
        for link in ("bridge", "bridge_norm", "mc"):
            assert la(x, pred_type=pred_type, link_approx=link).dtype == dtype
        if not functional:
            assert la(x, pred_type="nn", link_approx="mc", n_samples=4).dtype == dtype
    elif not functional:
        means = la(x, pred_type="nn", link_approx="mc", n_samples=4)
        assert all(t.dtype == dtype for t in means)
    gen = torch.Generator().manual_seed(0)
    draws = la.functional_samples(x, n_samples=3, generator=gen)
    assert draws.dtype == dtype and draws.shape[:2] == (3, 4)
    assert la.predictive_samples(x, n_samples=3, generator=gen).dtype == dtype
    if not functional:
        assert la.sample(3, generator=gen).dtype == dtype
        for name in ("H", "posterior_precision"):
            tensors = floating(getattr(la, name))
            assert tensors and all(t.dtype == dtype for t in tensors), name
    if subset not in ("ella", "valla"):
        lml = la.log_marginal_likelihood()
        assert lml.dtype == dtype and torch.isfinite(lml)
        if ref is not None:
            close(lml, ref.log_marginal_likelihood(), dtype)
