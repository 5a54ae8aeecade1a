"""Monte-Carlo Fisher variants (``stochastic=True``) of the BackPACK and ASDL
backends: reproducibility with a generator, shapes, PSD and unbiasedness."""

from __future__ import annotations

import pytest
import torch
from test_backends import LIKS, TOL, case, kron_dense

from laplace.curvature import AsdlGGN, BackPackGGN

STRUCTURES = ["full", "diag", "kron"]


def compute(backend, structure, model, likelihood, x, y, **kwargs):
    curv = backend(model, likelihood, stochastic=True, **kwargs)
    if structure == "kron":
        return kron_dense(curv.kron(x, y, N=len(x))[1])
    return getattr(curv, structure)(x, y)[1]


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("backend", [BackPackGGN, AsdlGGN])
def test_reproducible_with_generator_and_global_rng_untouched(backend, structure):
    model, x, y, _ = case("mlp", "classification", 3)
    state = torch.get_rng_state()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return compute(backend, structure, model, "classification", x, y, generator=gen)

    first, again, other = run(7), run(7), run(8)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("backend", [BackPackGGN, AsdlGGN])
def test_shape_and_psd(backend, structure, likelihood, n_out):
    model, x, y, ref = case("cnn", likelihood, n_out)
    gen = torch.Generator().manual_seed(0)
    H = compute(backend, structure, model, likelihood, x, y, generator=gen)
    P = ref.theta.numel()
    if structure == "diag":
        assert H.shape == (P,) and (H >= 0).all()
        return
    assert H.shape == (P, P)
    torch.testing.assert_close(H, H.T, **TOL)
    assert torch.linalg.eigvalsh(H).min() > -1e-10


# Unbiasedness with many samples in one call.  Per data point and entry, the
# sampled diagonal is an average of M squares of Gaussian-like (regression) or
# bounded (classification) projections: its relative standard deviation is
# about sqrt(2 / M).  The tolerances are ~5 such standard deviations:
# M = 4000 (BackPACK, vectorised over samples) -> rtol 0.12;
# M = 128 (ASDL, one backward pass per sample) -> rtol 0.5, which still
# catches a wrong scaling by the number of samples (a factor 128).  Entries
# near zero are compared with an absolute tolerance of rtol * max |entry|.
@pytest.mark.parametrize("likelihood,n_out", LIKS)
@pytest.mark.parametrize(
    "backend,M,rtol", [(BackPackGGN, 4000, 0.12), (AsdlGGN, 128, 0.5)]
)
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_unbiased(structure, backend, M, rtol, likelihood, n_out):
    model, x, y, ref = case("mlp", likelihood, n_out)
    gen = torch.Generator().manual_seed(0)
    estimate = compute(
        backend, structure, model, likelihood, x, y, num_samples=M, generator=gen
    )
    if structure == "diag":
        exact = ref.ggn.diagonal()
    else:
        exact = kron_dense(backend(model, likelihood).kron(x, y, N=len(x))[1])
    atol = rtol * exact.abs().max()
    torch.testing.assert_close(estimate, exact, rtol=rtol, atol=atol)


def test_backpack_full_unbiased():
    """BackPACK's sampled GGN square root, M = 4000 (see above for tolerances)."""
    model, x, y, ref = case("mlp", "classification", 3)
    gen = torch.Generator().manual_seed(0)
    H = compute(
        BackPackGGN,
        "full",
        model,
        "classification",
        x,
        y,
        num_samples=4000,
        generator=gen,
    )
    torch.testing.assert_close(H, ref.ggn, rtol=0.12, atol=0.12 * ref.ggn.abs().max())


def test_mc_samples_alias():
    model, x, y, _ = case("mlp", "regression", 2)
    curv = BackPackGGN(model, "regression", stochastic=True, mc_samples=5)
    assert curv.num_samples == 5
