"""laplace-torch's API of the function-space classes (FunctionalLaplace,
FunctionalLLLaplace, ELLA, VaLLA): sampling signatures, the subset of data and
the protected kernel extension points of FunctionalLaplace."""

import numpy as np
import pytest
import torch
from ground_truth import dense_jacobians, tiny_data, tiny_net
from torch.utils.data import DataLoader, TensorDataset

from laplace import ELLA, FullLaplace, FunctionalLaplace, FunctionalLLLaplace, VaLLA

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


# ---- FunctionalLaplace: subset of data and kernel extension points -------------------
def test_subset_is_laplace_torchs_for_the_same_seed():
    """numpy.random.default_rng(seed).choice(N, n_subset, replace=False), in that
    order, batched like the training loader, the same on every pass."""
    model = tiny_net(1)
    X, y = tiny_data("regression", 1, n=30)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    for seed in (0, 7):
        la = FunctionalLaplace(model, "regression", n_subset=10, seed=seed)
        idx = np.random.default_rng(seed).choice(30, 10, replace=False)
        sod = la._get_SoD_data_loader(loader)
        for _ in range(2):
            batches = list(sod)
            assert [len(b[0]) for b in batches] == [4, 4, 2]
            torch.testing.assert_close(torch.cat([b[0] for b in batches]), X[idx])
        la.fit(loader)
        torch.testing.assert_close(la.state_dict()["subset_inputs"], X[idx])


@pytest.mark.parametrize("independent", [False, True])
def test_kernels_are_plain_jacobian_gram_matrices(independent):
    model = tiny_net(3)
    la = FunctionalLaplace(
        model, "regression", n_subset=5, independent_outputs=independent
    )
    X1, _ = tiny_data("regression", 3, n=4, seed=2)
    X2, _ = tiny_data("regression", 3, n=6, seed=3)
    J1, J2 = dense_jacobians(model, X1), dense_jacobians(model, X2)
    # K[i, j, c, d] = J1[i, c] . J2[j, d], written out
    full = torch.zeros(4, 6, 3, 3)
    for i in range(4):
        for j in range(6):
            for c in range(3):
                for d in range(3):
                    full[i, j, c, d] = J1[i, c] @ J2[j, d]
    diag = full.diagonal(dim1=2, dim2=3)  # (4, 6, 3)
    self_full = torch.einsum("icp,jdp->ijcd", J1, J1)
    if independent:
        expected_batch, expected_batch_star = diag, diag
        expected_star = self_full.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1)
        expected_joint = self_full.diagonal(dim1=2, dim2=3)
    else:
        expected_batch = full.transpose(1, 2).reshape(12, 18)
        expected_batch_star = full
        expected_star = self_full.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
        expected_joint = self_full
    torch.testing.assert_close(la._kernel_batch(J1, J2), expected_batch)
    torch.testing.assert_close(la._kernel_batch_star(J1, J2), expected_batch_star)
    torch.testing.assert_close(la._kernel_star(J1), expected_star)
    torch.testing.assert_close(la._kernel_star(J1, joint=True), expected_joint)


class DoubledKernel(FunctionalLaplace):
    """A subclass doubling the NTK, the same as halving the prior precision."""

    def _kernel_batch(self, jacobians, batch):
        return 2 * super()._kernel_batch(jacobians, batch)

    def _kernel_star(self, jacobians, joint=False):
        return 2 * super()._kernel_star(jacobians, joint)

    def _kernel_batch_star(self, jacobians, batch):
        return 2 * super()._kernel_batch_star(jacobians, batch)


@pytest.mark.parametrize("likelihood,n_out", [("regression", 2), ("classification", 3)])
@pytest.mark.parametrize("independent", [False, True])
def test_overridden_kernels_are_used(likelihood, n_out, independent):
    model = tiny_net(n_out)
    X, y = tiny_data(likelihood, n_out, n=20)
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    kwargs = {"n_subset": 8, "independent_outputs": independent}
    doubled = DoubledKernel(model, likelihood, prior_precision=1.0, **kwargs)
    halved = FunctionalLaplace(model, likelihood, prior_precision=0.5, **kwargs)
    doubled.fit(loader)
    halved.fit(loader)
    X_test = X[:5] + 0.1
    for joint in (False, True):
        torch.testing.assert_close(
            doubled.predictive_moments(X_test, joint=joint)[1],
            halved.predictive_moments(X_test, joint=joint)[1],
            rtol=1e-9,
            atol=1e-12,
        )
    torch.testing.assert_close(doubled.log_det_ratio, halved.log_det_ratio)


def test_overridden_subset_loader_is_used():
    """A subclass choosing its own subset gets the FullLaplace of that subset."""
    model = tiny_net(1)
    X, y = tiny_data("regression", 1, n=20)
    rows = [3, 1, 4, 15, 9]

    class FirstRows(FunctionalLaplace):
        def _get_SoD_data_loader(self, train_loader):
            return DataLoader(TensorDataset(X[rows], y[rows]), batch_size=2)

    la = FirstRows(model, "regression", n_subset=5, prior_precision=0.5)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=6))
    full = FullLaplace(model, "regression", prior_precision=0.5)
    full.fit(DataLoader(TensorDataset(X[rows], y[rows]), batch_size=5))
    X_test = torch.randn(3, 2)
    torch.testing.assert_close(la(X_test)[1], full(X_test)[1], rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), full.log_marginal_likelihood(), rtol=1e-7, atol=0
    )


def test_valla_history_records_the_minimised_loss():
    """fit_history_['objective'] holds the negative alpha-energy (laplace-torch's
    sign); the first entry is that of the initial state, S = K_ZZ (the prior)."""
    model = tiny_net(2)
    X, y = tiny_data("regression", 2, n=10)
    la = VaLLA(model, "regression", X[:4], prior_precision=0.7, sigma_noise=0.8)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=10), iterations=3, lr=1e-2)
    k = 4 * 2
    L0 = torch.eye(k) / 0.7**0.5
    rows, cols = torch.tril_indices(k, k)
    energy = la.objective(
        X,
        y,
        L0[rows, cols],
        torch.tensor(0.7).log(),
        2 * torch.tensor(0.8).log(),
    )
    hist = la.fit_history_["objective"]
    assert len(hist) == 3
    assert hist[0] == pytest.approx(-float(energy), rel=1e-10)
