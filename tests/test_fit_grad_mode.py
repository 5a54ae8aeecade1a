"""``fit`` under ``torch.no_grad()`` or ``torch.inference_mode()`` turns autograd
on for its own duration: the same posterior as a plain fit, for every class, and
the caller's mode afterwards."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace
from tests.model_zoo import (
    ALL_KEYS,
    KEY_IDS,
    Net,
    fit_laplace,
    loader,
    make_laplace,
)

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
X_TEST = torch.randn(4, 3, generator=torch.Generator().manual_seed(9)).double()


def _outputs(la):
    out = la(X_TEST)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("key", ALL_KEYS, ids=KEY_IDS)
def test_fit_under_no_grad_equals_plain_fit(key, mode):
    likelihood = "regression" if key[1] == "variational" else "classification"
    plain = make_laplace(Net(), likelihood, key)
    fit_laplace(plain, loader(likelihood))
    la = make_laplace(Net(), likelihood, key)
    with MODES[mode]():
        fit_laplace(la, loader(likelihood))
        # the caller's mode is back
        assert not torch.is_grad_enabled()
        assert torch.is_inference_mode_enabled() == (mode == "inference_mode")
    for got, want in zip(_outputs(la), _outputs(plain)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if key[1] not in ("nystrom", "variational"):  # no Laplace evidence
        torch.testing.assert_close(
            la.log_marginal_likelihood(), plain.log_marginal_likelihood()
        )


def test_data_made_under_inference_mode():
    """Inference tensors cannot be saved for backward: fit copies them."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(2, (12,), generator=gen)
    with torch.inference_mode():
        X_inf, y_inf = X.clone(), y.clone()
    assert X_inf.is_inference()
    results = []
    for data in ((X, y), (X_inf, y_inf)):
        la = FullLaplace(Net(), "classification")
        la.fit(DataLoader(TensorDataset(*data), batch_size=5))
        results.append(la.posterior_precision)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_model_built_under_inference_mode_is_refused():
    """Its parameters get no gradients (backward silently gives none)."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    la = FullLaplace(model, "classification")
    with pytest.raises(ValueError, match="'0.weight' is an inference tensor"):
        fit_laplace(la, loader("classification"))
    assert not la.is_fitted
