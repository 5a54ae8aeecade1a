"""Online marginal-likelihood training (``laplace.marglik_training``).

Ground truth is Bayesian linear regression in closed form: for ``f(x) = w^T x``
with fixed noise the evidence ``log N(y; 0, sigma^2 I + X X^T / alpha)`` is
maximised over ``alpha`` (and ``sigma``) numerically with scipy on an
eigendecomposition of ``X X^T``, independently of the library. The fixed point of
marglik training (MAP weights for the current prior, stationary Laplace evidence
w.r.t. the hyperparameters) is MacKay's ``alpha = gamma / ||w||^2``, which for a
linear-Gaussian model is exactly the evidence maximiser.
"""

import math
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

import laplace.curvature
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.curvature import CurvlinopsGGN, GGNInterface
from laplace.marglik_training import marglik_training

N, D, SIGMA = 40, 3, 0.5


def linear_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen)
    w = torch.randn(D, generator=gen)
    y = X @ w + SIGMA * torch.randn(N, generator=gen)
    return X, y.unsqueeze(-1)


def evidence_optimum(X, y, sigma=None):
    """Evidence-maximising ``(alpha, sigma)`` of Bayesian linear regression; with
    ``sigma`` given only ``alpha`` is optimised."""
    evals, U = np.linalg.eigh((X @ X.T).numpy())
    z2 = (U.T @ y.squeeze(-1).numpy()) ** 2

    def neg_log_evidence(v):
        noise = sigma**2 if sigma is not None else math.exp(2 * v[1])
        c = noise + evals / math.exp(v[0])
        return 0.5 * (np.log(c).sum() + (z2 / c).sum())

    x0 = [0.0] if sigma is not None else [0.0, 0.0]
    opt = minimize(
        neg_log_evidence,
        x0,
        method="Nelder-Mead",
        options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 20000},
    )
    return np.exp(opt.x)


def train_linear(X, y, lr=0.2, **kwargs):
    loader = DataLoader(TensorDataset(X, y), batch_size=N)
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False)
    options = dict(
        likelihood="regression",
        hessian_structure="full",
        backend=GGNInterface,
        optimizer_cls=torch.optim.SGD,
        optimizer_kwargs={"lr": lr},
        n_epochs=30,
        prior_structure="scalar",
    )
    options.update(kwargs)
    return marglik_training(model, loader, **options)


# The MAP is reached by full-batch SGD and the hyperparameters by Adam with a
# fixed step size, so the fixed point is approached, not hit: after these epochs
# both are within 1e-8 relative of it; 1e-6 leaves room for round-off.
RTOL_FIXED_POINT = 1e-6


def test_prior_precision_matches_evidence_maximiser_and_mackay():
    X, y = linear_problem()
    # the batch loss is MSE + sigma^2 delta |w|^2 / N, 2 sigma^2 times the
    # negative log joint per data point: a step 1 / (2 sigma^2) larger
    la, model, *_ = train_linear(
        X, y, lr=0.4, n_epochs=40, sigma_noise_init=SIGMA, fix_sigma_noise=True
    )
    (alpha,) = evidence_optimum(X, y, sigma=SIGMA)
    assert la.prior_precision.item() == pytest.approx(alpha, rel=RTOL_FIXED_POINT)
    assert la.sigma_noise.item() == SIGMA
    # MacKay: alpha ||w||^2 = gamma = sum_i lambda_i / (lambda_i + alpha), with
    # lambda_i the eigenvalues of X^T X / sigma^2
    lam = torch.linalg.eigvalsh(X.T @ X / SIGMA**2)
    gamma = (lam / (lam + la.prior_precision)).sum()
    w = model.weight.detach().flatten()
    assert (la.prior_precision * w @ w).item() == pytest.approx(
        gamma.item(), rel=RTOL_FIXED_POINT
    )


def test_prior_and_noise_match_evidence_maximiser():
    X, y = linear_problem(seed=1)
    la, *_ = train_linear(X, y, lr=0.2, n_epochs=60)
    alpha, sigma = evidence_optimum(X, y)
    assert la.prior_precision.item() == pytest.approx(alpha, rel=RTOL_FIXED_POINT)
    assert la.sigma_noise.item() == pytest.approx(sigma, rel=RTOL_FIXED_POINT)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_map_objective_with_fixed_prior(temperature):
    """Without hyperparameter steps the network minimises ``MSE + 0.5 delta |w|^2
    / N / c`` with ``c = T / (2 sigma^2)``: ``w = (X^T X T / sigma^2 + delta
    I)^{-1} X^T y T / sigma^2``."""
    X, y = linear_problem(seed=3)
    delta, sigma = 3.0, 0.7
    la, model, margliks, losses = train_linear(
        X,
        y,
        n_hypersteps=0,
        n_epochs=150,
        marglik_frequency=150,
        prior_prec_init=delta,
        sigma_noise_init=sigma,
        temperature=temperature,
        optimizer_kwargs={"lr": 0.3},
    )
    c = temperature / sigma**2
    w_map = torch.linalg.solve(c * X.T @ X + delta * torch.eye(D), c * X.T @ y)
    torch.testing.assert_close(model.weight.detach().T, w_map, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.mean, w_map.flatten(), rtol=1e-9, atol=1e-12)
    assert margliks == []  # a phase without steps adds no entry
    assert la.prior_precision.item() == delta and la.sigma_noise.item() == sigma
    assert la.temperature == temperature
    # the epoch loss per data point, as minimised
    w = w_map.flatten()
    crit = temperature / (2 * sigma**2)
    expected = (X @ w - y.flatten()).square().mean() + 0.5 * delta * w @ w / N / crit
    assert losses[-1] == pytest.approx(expected.item(), rel=1e-9)


# ---- an independent reference loop of the documented algorithm ------------------
def _linear_jacobians(X, n_out):
    """``(N, C, C * D + C)``: ``f = W x + b`` w.r.t. ``[W.flatten(), b]``."""
    eye = torch.eye(n_out)
    JW = torch.einsum("oc,nd->nocd", eye, X).reshape(len(X), n_out, -1)
    return torch.cat([JW, eye.expand(len(X), -1, -1)], dim=-1)


def _closed_form_lml(model, X, y, likelihood, delta, sigma, T):
    """Laplace evidence of a linear model at its current weights: exact GGN
    ``sum_n J_n^T Lambda_n J_n``, layer-wise prior ``delta`` (weight, bias)."""
    W, b = model.weight.detach(), model.bias.detach()
    theta = torch.cat([W.flatten(), b])
    f = X @ W.T + b
    J = _linear_jacobians(X, f.shape[1])
    prior = torch.cat([delta[0].expand(W.numel()), delta[1].expand(b.numel())])
    if likelihood == "regression":
        lam = torch.eye(f.shape[1]).expand(len(X), -1, -1)
        c = 1 / (sigma**2 * T)
        log_lik = -0.5 * (f - y).square().sum() * c
        log_lik = log_lik - len(X) * f.shape[1] * torch.log(
            sigma * (2 * math.pi) ** 0.5
        )
    else:
        p = torch.softmax(f, -1)
        lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        c = 1 / T
        log_lik = -nn.functional.cross_entropy(f, y, reduction="sum") * c
    H = torch.einsum("nop,noq,nqr->pr", J, lam, J)
    P = c * H + torch.diag(prior)
    log_det_ratio = torch.logdet(P) - prior.log().sum()
    return log_lik - 0.5 * (log_det_ratio + theta @ (prior * theta))


def _reference(X, y, likelihood, n_out, opts):
    """The algorithm of laplace-torch's documentation, written out."""
    torch.manual_seed(0)
    model = nn.Linear(D, n_out)
    opt = torch.optim.Adam(model.parameters(), lr=opts["lr"])
    delta = torch.full((2,), opts["prior_prec_init"])
    sigma = torch.tensor(opts["sigma_noise_init"])
    learn_sigma = likelihood == "regression" and not opts["fix_sigma_noise"]
    log_delta = delta.log().requires_grad_()
    log_sigma = sigma.log().requires_grad_(learn_sigma)
    hyper_opt = torch.optim.Adam(
        [log_delta, log_sigma] if learn_sigma else [log_delta], lr=opts["lr_hyp"]
    )
    T, bs = opts["temperature"], opts["batch_size"]
    margliks, losses, best = [], [], (math.inf, None, None, None)
    for epoch in range(1, opts["n_epochs"] + 1):
        epoch_loss = 0.0
        for start in range(0, N, bs):
            xb, yb = X[start : start + bs], y[start : start + bs]
            opt.zero_grad()
            f = model(xb)
            if likelihood == "regression":
                crit = (f - yb).square().mean()
                c = T / (2 * sigma**2)
            else:
                crit = nn.functional.cross_entropy(f, yb)
                c = T
            penalty = delta[0] * model.weight.square().sum()
            penalty = penalty + delta[1] * model.bias.square().sum()
            loss = crit + 0.5 * penalty / N / c
            loss.backward()
            opt.step()
            epoch_loss += loss.item() * len(yb)
        losses.append(epoch_loss / N)
        if epoch % opts["marglik_frequency"] != 0 or epoch < opts["n_epochs_burnin"]:
            continue
        for _ in range(opts["n_hypersteps"]):
            hyper_opt.zero_grad()
            d, s = log_delta.exp(), log_sigma.exp() if learn_sigma else sigma
            neg = -_closed_form_lml(model, X, y, likelihood, d, s, T)
            neg.backward()
            hyper_opt.step()
            margliks.append(neg.item())
            if margliks[-1] < best[0]:
                state = {k: v.clone() for k, v in model.state_dict().items()}
                best = (margliks[-1], state, d.detach(), s.detach())
            delta = log_delta.detach().exp()
            if learn_sigma:
                sigma = log_sigma.detach().exp()
    if best[1] is not None:
        model.load_state_dict(best[1])
        delta, sigma = best[2], best[3]
    return model, delta, sigma, margliks, losses


@pytest.mark.parametrize(
    "likelihood,temperature,fix_sigma",
    [
        ("regression", 1.0, False),
        ("regression", 0.5, True),
        ("classification", 1.0, True),
        ("classification", 2.0, True),
    ],
)
def test_matches_independent_reference_loop(likelihood, temperature, fix_sigma):
    n_out = 3 if likelihood == "classification" else 2
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(N, D, generator=gen)
    if likelihood == "classification":
        y = torch.randint(n_out, (N,), generator=gen)
    else:
        y = X @ torch.randn(D, n_out, generator=gen)
        y = y + 0.3 * torch.randn(N, n_out, generator=gen)
    opts = dict(
        lr=0.05,
        lr_hyp=0.2,
        n_epochs=7,
        n_epochs_burnin=2,
        marglik_frequency=2,
        n_hypersteps=3,
        prior_prec_init=0.5,
        sigma_noise_init=0.8 if likelihood == "regression" else 1.0,
        temperature=temperature,
        fix_sigma_noise=fix_sigma,
        batch_size=16,
    )
    model, delta, sigma, margliks, losses = _reference(X, y, likelihood, n_out, opts)
    torch.manual_seed(0)
    la, trained, got_margliks, got_losses = marglik_training(
        nn.Linear(D, n_out),
        DataLoader(TensorDataset(X, y), batch_size=opts["batch_size"]),
        likelihood=likelihood,
        hessian_structure="full",
        backend=GGNInterface,
        optimizer_kwargs={"lr": opts["lr"]},
        n_epochs=opts["n_epochs"],
        lr_hyp=opts["lr_hyp"],
        prior_structure="layerwise",
        n_epochs_burnin=opts["n_epochs_burnin"],
        n_hypersteps=opts["n_hypersteps"],
        marglik_frequency=opts["marglik_frequency"],
        prior_prec_init=opts["prior_prec_init"],
        sigma_noise_init=opts["sigma_noise_init"],
        temperature=temperature,
        fix_sigma_noise=fix_sigma,
    )
    # phases after epochs 2, 4, 6
    assert len(got_margliks) == 9 and len(got_losses) == 7
    assert got_losses == pytest.approx(losses, rel=1e-10)
    assert got_margliks == pytest.approx(margliks, rel=1e-10)
    # the best entry's state and hyperparameters, and a Laplace fitted on them
    for got, want in zip(trained.parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.prior_precision, delta, rtol=1e-10, atol=0)
    torch.testing.assert_close(la.sigma_noise, sigma.reshape(()), rtol=1e-10, atol=0)
    assert -la.log_marginal_likelihood().item() == pytest.approx(
        min(got_margliks), rel=1e-10
    )


def regression_mlp_problem(seed=0, n=64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, generator=gen) * 6 - 3
    y = torch.sin(X) + 0.1 * torch.randn(n, 1, generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)


def classification_mlp_problem(seed=0, n=64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=gen)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 0] > 1).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)


@pytest.mark.parametrize(
    "likelihood,structure,prior_structure,cls,backend",
    [
        ("regression", "kron", "layerwise", KronLaplace, CurvlinopsGGN),
        ("regression", "diag", "diag", DiagLaplace, CurvlinopsGGN),
        ("classification", "kron", "scalar", KronLaplace, CurvlinopsGGN),
        # torch.func GGN: dense curvlinops operators are slow on CPU
        ("classification", "full", "layerwise", FullLaplace, GGNInterface),
    ],
)
def test_marglik_improves_and_returns_documented_tuple(
    likelihood, structure, prior_structure, cls, backend
):
    problem = (
        regression_mlp_problem
        if likelihood == "regression"
        else (classification_mlp_problem)
    )
    model, loader = problem()
    n_epochs = 8
    la, trained, margliks, losses = marglik_training(
        model,
        loader,
        likelihood=likelihood,
        hessian_structure=structure,
        backend=backend,
        optimizer_kwargs={"lr": 1e-2},
        n_epochs=n_epochs,
        n_hypersteps=5,
        prior_structure=prior_structure,
    )
    assert trained is model
    assert type(la) is cls and la.is_fitted
    assert len(losses) == n_epochs and len(margliks) == n_epochs * 5
    assert all(math.isfinite(v) for v in margliks + losses)
    assert margliks[-1] < margliks[0] - 1.0  # negative log marginal likelihoods
    # fitted at the kept parameters, with the kept hyperparameters
    torch.testing.assert_close(la.mean, parameters_to_vector(model.parameters()))
    assert -la.log_marginal_likelihood().item() == pytest.approx(min(margliks))
    n_prior = {"scalar": 1, "layerwise": 4, "diag": la.n_params}[prior_structure]
    assert la.prior_precision.shape == (n_prior,)
    assert not la.prior_precision.requires_grad


@pytest.mark.parametrize(
    "n_epochs,burnin,frequency,phases",
    [(7, 2, 2, 3), (5, 5, 1, 1), (6, 0, 3, 2), (4, 5, 1, 0)],
)
def test_burnin_and_frequency(n_epochs, burnin, frequency, phases):
    """A phase runs when ``epoch % frequency == 0 and epoch >= burnin``, with
    one entry per hyperparameter step."""
    model, loader = regression_mlp_problem()
    la, _, margliks, losses = marglik_training(
        model,
        loader,
        likelihood="regression",
        backend=CurvlinopsGGN,
        n_epochs=n_epochs,
        n_epochs_burnin=burnin,
        marglik_frequency=frequency,
        n_hypersteps=2,
    )
    assert len(margliks) == 2 * phases and len(losses) == n_epochs
    # the returned Laplace sits at the kept parameters
    torch.testing.assert_close(la.mean, parameters_to_vector(model.parameters()))
    if phases == 0:
        assert (la.prior_precision == 1).all() and la.sigma_noise.item() == 1


@pytest.mark.parametrize("fix", [True, False])
def test_fix_sigma_noise(fix):
    model, loader = regression_mlp_problem()
    la, *_ = marglik_training(
        model,
        loader,
        likelihood="regression",
        backend=CurvlinopsGGN,
        n_epochs=3,
        sigma_noise_init=0.3,
        fix_sigma_noise=fix,
    )
    assert (la.sigma_noise.item() == 0.3) is fix


def test_classification_keeps_unit_noise_and_model_mode():
    model, loader = classification_mlp_problem()
    model.eval()
    la, *_ = marglik_training(
        model, loader, backend=CurvlinopsGGN, n_epochs=2, n_hypersteps=1
    )
    assert la.sigma_noise.item() == 1.0
    assert not any(m.training for m in model.modules())


def test_only_trainable_parameters_are_trained():
    model, loader = regression_mlp_problem()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    la, *_ = marglik_training(
        model, loader, likelihood="regression", backend=CurvlinopsGGN, n_epochs=2
    )
    assert torch.equal(model[0].weight, frozen)
    assert la.n_params == sum(p.numel() for p in model.parameters()) - frozen.numel()
    assert la.prior_precision.shape == (3,)


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, batch):
        return self.net(batch["features"])


def test_dict_batches():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 2, generator=gen)
    y = (X.sum(1) > 0).long()
    data = [{"features": X[i], "target": y[i]} for i in range(len(X))]
    loader = DataLoader(data, batch_size=8)
    torch.manual_seed(0)
    model = DictModel()
    la, _, margliks, _ = marglik_training(
        model,
        loader,
        backend=CurvlinopsGGN,
        n_epochs=3,
        dict_key_x="features",
        dict_key_y="target",
    )
    probs = la({"features": X[:4]})
    assert probs.shape == (4, 3) and len(margliks) == 3 * 10


def test_weight_decay_is_replaced_by_the_prior():
    results = []
    for kwargs in ({"lr": 1e-2}, {"lr": 1e-2, "weight_decay": 1.0}):
        model, loader = regression_mlp_problem()
        torch.manual_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, trained, _, _ = marglik_training(
                model,
                loader,
                likelihood="regression",
                backend=CurvlinopsGGN,
                optimizer_kwargs=kwargs,
                n_epochs=2,
            )
        assert any("weight_decay" in str(w.message) for w in caught) == (
            "weight_decay" in kwargs
        )
        results.append(parameters_to_vector(trained.parameters()))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_scheduler_steps_once_per_epoch():
    steps = []

    class Recorder(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer, factor):
            self.factor = factor
            super().__init__(optimizer)

        def get_lr(self):
            steps.append(self.last_epoch)
            return [g["lr"] * self.factor for g in self.optimizer.param_groups]

    model, loader = regression_mlp_problem()
    marglik_training(
        model,
        loader,
        likelihood="regression",
        backend=CurvlinopsGGN,
        scheduler_cls=Recorder,
        scheduler_kwargs={"factor": 0.5},
        n_epochs=3,
        n_hypersteps=1,
    )
    assert steps == [0, 1, 2, 3]  # construction, then one step per epoch


def test_default_backend_is_asdl():
    from laplace.curvature import AsdlGGN

    model, loader = classification_mlp_problem()
    la, *_ = marglik_training(model, loader, n_epochs=1, n_hypersteps=1)
    assert isinstance(la.backend, AsdlGGN)


def test_default_backend_falls_back_to_curvlinops(monkeypatch):
    monkeypatch.delattr(laplace.curvature, "AsdlGGN", raising=False)
    monkeypatch.setitem(sys.modules, "laplace.curvature.asdl", None)
    model, loader = classification_mlp_problem()
    with pytest.warns(UserWarning, match="CurvlinopsGGN"):
        la, *_ = marglik_training(model, loader, n_epochs=1, n_hypersteps=1)
    assert type(la.backend) is CurvlinopsGGN


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"likelihood": "poisson"}, "likelihood"),
        ({"hessian_structure": "lowrank"}, "hessian_structure"),
        ({"hessian_structure": "banana"}, "hessian_structure"),
        ({"prior_structure": "blockwise"}, "prior_structure"),
        ({"prior_structure": "diag"}, "prior_structure='diag'"),
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": 2.0}, "n_epochs"),
        ({"n_epochs_burnin": -1}, "n_epochs_burnin"),
        ({"n_hypersteps": -1}, "n_hypersteps"),
        ({"marglik_frequency": 0}, "marglik_frequency"),
        ({"lr_hyp": 0.0}, "lr_hyp"),
        ({"temperature": -1.0}, "temperature"),
        ({"sigma_noise_init": 0.5}, "sigma_noise_init"),
        ({"prior_prec_init": -1.0}, "prior_prec_init"),
        ({"prior_prec_init": torch.ones(3)}, "prior_prec_init has 3 values"),
    ],
)
def test_invalid_arguments(kwargs, match):
    model, loader = classification_mlp_problem()
    options = {"backend": CurvlinopsGGN, "n_epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        marglik_training(model, loader, **options)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backend": CurvlinopsGGN(nn.Linear(1, 1), "regression")},
        {"optimizer_kwargs": [("lr", 1.0)]},
        {"scheduler_kwargs": 3},
        {"dict_key_x": 0},
    ],
)
def test_invalid_argument_types(kwargs):
    model, loader = classification_mlp_problem()
    options = {"backend": CurvlinopsGGN, "n_epochs": 1, **kwargs}
    with pytest.raises(TypeError):
        marglik_training(model, loader, **options)
