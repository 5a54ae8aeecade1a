"""Non-contiguous parameters (a weight that is a transposed view) work
everywhere: fit, predictives, samples, marginal likelihood, prior tuning and
marglik training give the numbers of the same model with contiguous
parameters, and the dense torch.func GGN."""

import pytest
import torch

from laplace import FullLaplace
from laplace.marglik_training import marglik_training
from tests.ground_truth import DenseCurvature
from tests.model_zoo import (
    ALL_KEYS,
    Net,
    fit_laplace,
    loader,
    make_laplace,
    transposed,
)

X_TEST = torch.randn(4, 3, generator=torch.Generator().manual_seed(9)).double()
RTOL = dict(rtol=1e-10, atol=1e-12)


def _call(la, **kwargs):
    out = la(X_TEST, **kwargs)
    return out if isinstance(out, tuple) else (out,)


# each class once, the likelihoods alternating (both paths of every structure
# are covered across the subsets)
CASES = [
    (key, ("classification", "regression")[i % 2]) for i, key in enumerate(ALL_KEYS)
]
CASES += [(("all", "full"), "regression"), (("last_layer", "kron"), "classification")]


@pytest.mark.parametrize("key,likelihood", CASES, ids=str)
def test_same_numbers_as_contiguous_parameters(key, likelihood):
    las = []
    assert not transposed(Net()).head.weight.is_contiguous()
    for model in (Net(), transposed(Net())):
        la = make_laplace(model, likelihood, key)
        fit_laplace(la, loader(likelihood))
        las.append(la)
    la, ref = las[1], las[0]
    for got, want in zip(_call(la), _call(ref)):
        torch.testing.assert_close(got, want, **RTOL)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # diagonal: the square root of a full output covariance with equal
    # eigenvalues (last layer, regression) depends on round-off
    sample_kwargs = dict(n_samples=5, diagonal_output=True)
    torch.testing.assert_close(
        la.functional_samples(X_TEST, generator=gen(), **sample_kwargs),
        ref.functional_samples(X_TEST, generator=gen(), **sample_kwargs),
        **RTOL,
    )
    if key[1] in ("nystrom", "variational"):
        return  # no weight samples, no Laplace evidence
    torch.testing.assert_close(
        la.log_marginal_likelihood(), ref.log_marginal_likelihood(), **RTOL
    )
    if key[1] == "gp":
        return
    torch.testing.assert_close(la.mean, ref.mean, rtol=0, atol=0)
    torch.testing.assert_close(
        la.sample(5, generator=gen()), ref.sample(5, generator=gen()), **RTOL
    )
    nn_kwargs = dict(pred_type="nn", link_approx="mc", n_samples=5)
    for got, want in zip(
        _call(la, generator=gen(), **nn_kwargs),
        _call(ref, generator=gen(), **nn_kwargs),
    ):
        torch.testing.assert_close(got, want, **RTOL)
    la.optimize_prior_precision(method="marglik", n_steps=5)
    ref.optimize_prior_precision(method="marglik", n_steps=5)
    torch.testing.assert_close(la.prior_precision, ref.prior_precision, **RTOL)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_full_curvature_matches_dense_ggn(likelihood):
    model = transposed(Net())
    la = FullLaplace(model, likelihood)
    train = loader(likelihood, batch_size=12)
    la.fit(train)
    X, y = next(iter(train))
    truth = DenseCurvature(Net(), X, y, likelihood).ggn
    torch.testing.assert_close(la.H, truth, **RTOL)


def test_marglik_training():
    results = []
    for model in (Net(), transposed(Net())):
        la, trained, margliks, losses = marglik_training(
            model,
            loader("regression"),
            likelihood="regression",
            hessian_structure="full",
            n_epochs=3,
            n_hypersteps=2,
            optimizer_kwargs={"lr": 1e-2},
        )
        results.append((la.mean, la.prior_precision, margliks, losses))
    (mean, prior, margliks, losses), ref = results[1], results[0]
    torch.testing.assert_close(mean, ref[0], **RTOL)
    torch.testing.assert_close(prior, ref[1], **RTOL)
    assert margliks == pytest.approx(ref[2], rel=1e-10)
    assert losses == pytest.approx(ref[3], rel=1e-10)
