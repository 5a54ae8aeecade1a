"""laplace-torch's API of the function-space classes (FunctionalLaplace,
FunctionalLLLaplace, ELLA, VaLLA): sampling signatures, the subset of data and
the protected kernel extension points of FunctionalLaplace."""

import pytest
import torch
from ground_truth import tiny_data, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, FunctionalLaplace, FunctionalLLLaplace, VaLLA

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["sod", "sod_ll", "ella", "valla"]


def fitted(kind: str, likelihood: str = "regression", n_out: int = 2):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, n=20)
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    if kind == "sod":
        la = FunctionalLaplace(model, likelihood, n_subset=8)
    elif kind == "sod_ll":
        la = FunctionalLLLaplace(model, likelihood, n_subset=8)
    elif kind == "ella":
        la = ELLA(model, likelihood, subsample_size=8, n_eigenvalues=6)
    else:
        la = VaLLA(model, likelihood, "random", num_inducing=3)
    if kind == "valla":
        la.fit(loader, iterations=2)
    else:
        la.fit(loader)
    return la, model, X


@pytest.mark.parametrize("kind", CLASSES)
def test_samples_accept_laplace_torch_pred_types(kind):
    """functional_samples / predictive_samples take pred_type 'glm' (default),
    'nn' or 'gp' and always draw from the GP posterior; __call__ needs 'gp'."""
    la, _, X = fitted(kind, "classification", 3)
    x = X[:4]

    def draw(method, **kwargs):
        return method(
            x, n_samples=6, generator=torch.Generator().manual_seed(1), **kwargs
        )

    reference = draw(la.functional_samples, pred_type="gp")
    assert reference.shape == (6, 4, 3)
    for pred_type in ("glm", "nn", "gp"):
        torch.testing.assert_close(
            draw(la.functional_samples, pred_type=pred_type), reference, rtol=0, atol=0
        )
        probs = draw(la.predictive_samples, pred_type=pred_type)
        torch.testing.assert_close(probs, torch.softmax(reference, -1), rtol=0, atol=0)
    torch.testing.assert_close(draw(la.functional_samples), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pred_type"):
        la.functional_samples(x, pred_type="laplace")
    for pred_type in ("glm", "nn"):
        with pytest.raises(ValueError, match="pred_type='gp'"):
            la(x, pred_type=pred_type)


@pytest.mark.parametrize("kind", CLASSES)
def test_sample_raises_not_implemented(kind):
    la, _, _ = fitted(kind)
    with pytest.raises(NotImplementedError, match="functional_samples"):
        la.sample()
    with pytest.raises(NotImplementedError):
        la.sample(n_samples=3, generator=torch.Generator())
