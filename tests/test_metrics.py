"""Tests for laplace.utils.metrics and laplace.utils.plotting.

Ground truth comes from hand-worked examples, naive per-sample loops,
torch.nn.functional losses, scikit-learn's ``roc_auc_score`` and, for the
metrics we keep because torchmetrics lacks them, torchmetrics itself where a
relation exists (Brier = n_classes * MSE to the one-hot targets, ECE from the
reliability-diagram bins).
"""

from __future__ import annotations

import math
import sys

import matplotlib
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from laplace import Laplace
from laplace.utils.metrics import (
    RunningMSEMetric,
    RunningNLLMetric,
    accuracy,
    brier_score,
    ece,
    expected_calibration_error,
    gaussian_nll,
    maximum_calibration_error,
    mce,
    nll,
    ood_auroc,
    reliability_diagram_data,
)
from laplace.utils.plotting import plot_regression_band, plot_reliability_diagram

matplotlib.use("Agg")

DTYPES = [torch.float32, torch.float64]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# torchmetrics computes calibration errors and AUROC in float32.
RTOL_TM = 1e-6

# Four 3-class samples: one with confidence 0.4 (bin 0 of 2) and three in bin 1.
# Bin 0: n=1, acc=0, conf=0.4 -> gap 0.4.
# Bin 1: n=3, acc=2/3, conf=2.2/3 -> gap 0.2/3.
# ECE = 1/4 * 0.4 + 3/4 * 0.2/3 = 0.15, MCE = 0.4.
HAND_PROBS = [[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.4, 0.3, 0.3]]
HAND_TARGETS = [0, 1, 0, 1]


def _random_classification(n: int, c: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, c, generator=gen, dtype=dtype)
    targets = torch.randint(0, c, (n,), generator=gen)
    return logits.softmax(-1), targets


def _naive_ece_mce(probs: torch.Tensor, targets: torch.Tensor, n_bins: int):
    """Per-sample loop with bins [lower, upper) and confidence 1 in a bin of its own
    (torchmetrics' convention)."""
    bins = [[] for _ in range(n_bins + 1)]
    for p, t in zip(probs.tolist(), targets.tolist()):
        conf = max(p)
        b = next(i for i in range(n_bins + 1) if conf < (i + 1) / n_bins)
        bins[b].append((conf, float(p.index(conf) == t)))
    ece_ref, mce_ref = 0.0, 0.0
    for members in bins:
        if members:
            gap = abs(sum(c for _, c in members) - sum(a for a, _ in members))
            gap /= len(members)
            ece_ref += len(members) / len(probs) * gap
            mce_ref = max(mce_ref, gap)
    return ece_ref, mce_ref


# ---------------------------------------------------------------------------
# Functional classification metrics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_accuracy_and_brier_by_hand(dtype):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=dtype)
    targets = torch.tensor([0, 2])
    assert accuracy(probs, targets) == 0.5
    # (0.09 + 0.04 + 0.01 + 0.01 + 0.36 + 0.49) / 2
    assert brier_score(probs, targets) == pytest.approx(0.5, rel=RTOL[dtype])


def test_brier_is_n_classes_times_torchmetrics_mse():
    probs, targets = _random_classification(60, 4, torch.float64, seed=5)
    onehot = F.one_hot(targets, 4).to(probs.dtype)
    mse = torchmetrics.functional.mean_squared_error(probs, onehot)
    assert brier_score(probs, targets) == pytest.approx(4 * float(mse), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_brier_matches_loop(dtype):
    probs, targets = _random_classification(50, 4, dtype)
    ref = sum(
        sum((p - float(c == t)) ** 2 for c, p in enumerate(row))
        for row, t in zip(probs.tolist(), targets.tolist())
    ) / len(targets)
    assert brier_score(probs, targets) == pytest.approx(ref, rel=RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_matches_torch_nll_loss(dtype):
    probs, targets = _random_classification(40, 5, dtype)
    ref = F.nll_loss(probs.log(), targets).item()
    assert nll(probs, targets) == pytest.approx(ref, rel=RTOL[dtype])


def test_nll_is_finite_for_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    value = nll(probs, torch.tensor([1, 0]))
    tiny = torch.finfo(torch.float64).tiny
    assert value == pytest.approx((-math.log(tiny) + math.log(2)) / 2, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_calibration_errors_hand_example(dtype):
    probs = torch.tensor(HAND_PROBS, dtype=dtype)
    targets = torch.tensor(HAND_TARGETS)
    assert expected_calibration_error(probs, targets, n_bins=2) == pytest.approx(
        0.15, rel=RTOL_TM
    )
    assert maximum_calibration_error(probs, targets, n_bins=2) == pytest.approx(
        0.4, rel=RTOL_TM
    )
    assert ece is expected_calibration_error and mce is maximum_calibration_error


def test_perfect_calibration_gives_zero():
    # Confidence 0.75 with 3 of 4 correct, confidence 1 with 2 of 2 correct.
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[0.0, 1.0]] * 2, dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    assert expected_calibration_error(probs, targets, n_bins=10) == 0.0
    assert maximum_calibration_error(probs, targets, n_bins=10) == 0.0


@pytest.mark.parametrize("n_bins", [1, 3, 15])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, *DTYPES])
def test_calibration_errors_match_naive_loop(n_bins, seed, dtype):
    probs, targets = _random_classification(200, 3, torch.float64, seed)
    # on a grid of 1/16, so that low-precision dtypes hold the values exactly and
    # some confidences sit on bin edges (including 1)
    probs = (probs * 16).round() / 16
    probs = probs.to(dtype)
    ece_ref, mce_ref = _naive_ece_mce(probs, targets, n_bins)
    assert ece(probs, targets, n_bins) == pytest.approx(ece_ref, rel=RTOL_TM)
    assert mce(probs, targets, n_bins) == pytest.approx(mce_ref, rel=RTOL_TM)


def test_calibration_errors_are_torchmetrics():
    probs, targets = _random_classification(300, 5, torch.float64, seed=3)
    for norm_, fn in [("l1", ece), ("max", mce)]:
        metric = torchmetrics.classification.MulticlassCalibrationError(
            num_classes=5, n_bins=10, norm=norm_
        )
        metric.update(probs[:100], targets[:100])
        metric.update(probs[100:], targets[100:])
        assert fn(probs, targets, 10) == float(metric.compute())


def test_reliability_diagram_data_hand_example():
    probs = torch.tensor(HAND_PROBS + [[0.5, 0.25, 0.25]], dtype=torch.float64)
    targets = torch.tensor(HAND_TARGETS + [0])
    data = reliability_diagram_data(probs, targets, n_bins=4)
    torch.testing.assert_close(
        data["bin_edges"], torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64)
    )
    # Confidence 0.5 lies on an edge and belongs to the upper bin ([lo, hi)).
    torch.testing.assert_close(data["count"], torch.tensor([0, 1, 3, 1]))
    expected_acc = torch.tensor([math.nan, 0.0, 2 / 3, 1.0], dtype=torch.float64)
    expected_conf = torch.tensor([math.nan, 0.4, 0.6, 0.9], dtype=torch.float64)
    torch.testing.assert_close(data["accuracy"], expected_acc, equal_nan=True)
    torch.testing.assert_close(data["confidence"], expected_conf, equal_nan=True)
    # confidence 1 belongs to the last bin
    one = reliability_diagram_data(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), 4)
    torch.testing.assert_close(one["count"], torch.tensor([0, 0, 0, 1]))


@pytest.mark.parametrize("n_bins", [2, 7, 15])
def test_reliability_bins_give_torchmetrics_ece(n_bins):
    # no confidence is exactly 1 here (torchmetrics bins those on their own)
    probs, targets = _random_classification(400, 4, torch.float64, seed=n_bins)
    assert bool((probs.max(-1).values < 1).all())
    data = reliability_diagram_data(probs, targets, n_bins)
    gaps = (data["accuracy"] - data["confidence"]).abs().nan_to_num()
    from_bins = float((gaps * data["count"]).sum() / len(targets))
    reference = multiclass_calibration_error(probs, targets, 4, n_bins=n_bins)
    assert from_bins == pytest.approx(float(reference), rel=RTOL_TM)


# ---------------------------------------------------------------------------
# OOD AUROC
# ---------------------------------------------------------------------------


def test_ood_auroc_hand_example():
    # Pairs: 0.9>0.8, 0.9>0.1, 0.8=0.8 (half), 0.8>0.1 -> 3.5 / 4.
    value = ood_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.8, 0.1]))
    assert value == 0.875


@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize("sizes", [(1, 1), (7, 13), (200, 50)])
def test_ood_auroc_matches_sklearn(with_ties, sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    n_in, n_out = sizes
    scores_in = torch.randn(n_in, generator=gen, dtype=torch.float64) + 0.5
    scores_out = torch.randn(n_out, generator=gen, dtype=torch.float64)
    if with_ties:
        scores_in, scores_out = scores_in.round(), scores_out.round()
    labels = [1] * n_in + [0] * n_out
    ref = roc_auc_score(labels, torch.cat([scores_in, scores_out]).numpy())
    assert ood_auroc(scores_in, scores_out) == pytest.approx(ref, rel=RTOL_TM)


def test_ood_auroc_extremes_and_dtype_mix():
    assert ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert ood_auroc(torch.tensor([0, 1]), torch.tensor([2.0, 3.0])) == 0.0
    assert ood_auroc(torch.ones(3), torch.ones(5)) == 0.5


def test_ood_auroc_keeps_large_scores_apart():
    # a sigmoid (what binary_auroc applies to scores outside [0, 1]) would map
    # all of these to 1.0 in float32 and report 0.5
    scores_in = torch.tensor([60.0, 80.0, 100.0])
    scores_out = torch.tensor([50.0, 55.0])
    assert ood_auroc(scores_in, scores_out) == 1.0
    assert ood_auroc(-scores_in, -scores_out) == 0.0


def test_ood_auroc_is_torchmetrics_for_probabilities():
    probs, _ = _random_classification(80, 3, torch.float64, seed=2)
    conf = probs.max(-1).values
    labels = torch.zeros(80, dtype=torch.long)
    labels[:50] = 1
    reference = torchmetrics.functional.classification.binary_auroc(conf, labels)
    assert ood_auroc(conf[:50], conf[50:]) == pytest.approx(
        float(reference), rel=RTOL_TM
    )


# ---------------------------------------------------------------------------
# Regression
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_nll_matches_closed_form_and_torch(dtype):
    mean = torch.tensor([[0.0], [1.0]], dtype=dtype)
    var = torch.tensor([[1.0], [4.0]], dtype=dtype)
    y = torch.tensor([[1.0], [1.0]], dtype=dtype)
    by_hand = 0.5 * (0.5 * math.log(2 * math.pi) + 0.5 + 0.5 * math.log(8 * math.pi))
    assert gaussian_nll(mean, var, y) == pytest.approx(by_hand, rel=RTOL[dtype])
    gen = torch.Generator().manual_seed(0)
    mean, y = torch.randn(2, 10, 3, generator=gen, dtype=dtype)
    var = torch.rand(10, 3, generator=gen, dtype=dtype) + 0.1
    ref = -norm.logpdf(y.double().numpy(), mean.double(), var.double().sqrt()).mean()
    assert gaussian_nll(mean, var, y) == pytest.approx(ref, rel=RTOL[dtype])


# ---------------------------------------------------------------------------
# Running metrics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_nll_equals_one_shot(dtype):
    probs, targets = _random_classification(30, 4, dtype)
    metric = RunningNLLMetric()
    for chunk in [slice(0, 7), slice(7, 8), slice(8, 8), slice(8, 30)]:
        metric.update(probs[chunk], targets[chunk])
    result = metric.compute()
    assert result.ndim == 0
    assert result.dtype == torch.promote_types(torch.get_default_dtype(), dtype)
    assert result.item() == pytest.approx(nll(probs, targets), rel=RTOL[dtype])
    metric.reset()
    metric.update(probs[:5], targets[:5])
    assert metric.compute().item() == pytest.approx(
        nll(probs[:5], targets[:5]), rel=RTOL[dtype]
    )


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_running_nll_honours_ignore_index(ignore_index):
    probs, targets = _random_classification(20, 3, torch.float64)
    targets = targets.clone()
    if ignore_index < 0:
        targets[::3] = ignore_index
    ref = F.nll_loss(probs.log(), targets, ignore_index=ignore_index).item()
    metric = RunningNLLMetric(ignore_index=ignore_index)
    metric.update(probs[:9], targets[:9])
    metric.update(probs[9:], targets[9:])
    assert metric.compute().item() == pytest.approx(ref, rel=1e-12)


def test_running_nll_accepts_sequence_dims():
    probs, targets = _random_classification(12, 5, torch.float64)
    metric = RunningNLLMetric()
    metric.update(probs.reshape(3, 4, 5), targets.reshape(3, 4))
    assert metric.compute().item() == pytest.approx(nll(probs, targets), rel=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_running_mse_equals_one_shot(dtype):
    gen = torch.Generator().manual_seed(0)
    preds, targets = torch.randn(2, 17, 3, generator=gen, dtype=dtype)
    metric = RunningMSEMetric()
    for chunk in [slice(0, 4), slice(4, 5), slice(5, 17)]:
        metric.update(preds[chunk], targets[chunk])
    ref = F.mse_loss(preds, targets).item()
    assert metric.compute().item() == pytest.approx(ref, rel=RTOL[dtype])
    metric.reset()
    with pytest.raises(RuntimeError, match="before any"):
        metric.compute()


@pytest.mark.parametrize(
    ("dtype", "result_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_running_metrics_accumulate_in_promoted_dtype(dtype, result_dtype):
    probs, targets = _random_classification(20, 3, torch.float64)
    probs = probs.to(dtype)
    torch.set_default_dtype(torch.float32)  # conftest restores float64 afterwards
    metric, mse = RunningNLLMetric(), RunningMSEMetric()
    metric.update(probs, targets)
    result = metric.compute()
    assert result.dtype == result_dtype
    # logs in the input dtype, their sum in float64
    ref = -probs.log().gather(-1, targets[:, None]).double().mean().item()
    assert result.item() == pytest.approx(ref, rel=1e-6)
    mse.update(probs, probs.flip(0))
    assert mse.compute().dtype == result_dtype and mse.compute().ndim == 0
    ref = F.mse_loss(probs.double(), probs.flip(0).double()).item()
    assert mse.compute().item() == pytest.approx(ref, rel=1e-6)
    metric.reset()
    assert metric.nll_sum.dtype == torch.float32  # reset restores the default


def test_running_metrics_are_torchmetrics_metrics():
    probs, targets = _random_classification(24, 3, torch.float64)
    metric = RunningNLLMetric()
    assert isinstance(metric, torchmetrics.Metric)
    assert isinstance(RunningMSEMetric(), torchmetrics.MeanSquaredError)
    # forward scores the batch and accumulates it
    batch_value = metric(probs[:10], targets[:10])
    assert float(batch_value) == pytest.approx(nll(probs[:10], targets[:10]), 1e-12)
    metric.update(probs[10:], targets[10:])
    assert float(metric.compute()) == pytest.approx(nll(probs, targets), rel=1e-12)
    # merging the states of two workers (what a distributed sync does) = one pass
    first, second = RunningNLLMetric(), RunningNLLMetric()
    first.update(probs[:5], targets[:5])
    second.update(probs[5:], targets[5:])
    first.merge_state(second)
    assert float(first.compute()) == pytest.approx(nll(probs, targets), rel=1e-12)
    # a MetricCollection holds it next to torchmetrics' own metrics
    collection = torchmetrics.MetricCollection(
        {
            "nll": RunningNLLMetric(),
            "acc": torchmetrics.Accuracy("multiclass", num_classes=3),
        }
    )
    collection.update(probs, targets)
    values = collection.compute()
    assert float(values["nll"]) == pytest.approx(nll(probs, targets), rel=1e-12)
    assert float(values["acc"]) == pytest.approx(accuracy(probs, targets))


def test_running_mse_equals_torchmetrics_mse():
    gen = torch.Generator().manual_seed(1)
    preds, targets = torch.randn(2, 30, 2, generator=gen)
    ours, theirs = RunningMSEMetric(), torchmetrics.MeanSquaredError(num_outputs=1)
    for p, t in zip(preds.split(7), targets.split(7)):
        ours.update(p, t)
        theirs.update(p.reshape(-1), t.reshape(-1))
    assert float(ours.compute()) == pytest.approx(float(theirs.compute()), rel=1e-6)


def test_running_nll_rejects_bad_ignore_index():
    for bad in [1.5, "x", True]:
        with pytest.raises(ValueError, match="ignore_index"):
            RunningNLLMetric(ignore_index=bad)


# ---------------------------------------------------------------------------
# Grid search scored with torchmetrics metrics
# ---------------------------------------------------------------------------


def _fitted(likelihood: str, n_out: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, n_out)
    ).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    if likelihood == "classification":
        y = torch.randint(n_out, (40,), generator=gen)
    else:
        y = torch.randn(40, n_out, generator=gen, dtype=torch.float64)
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="full")
    la.fit(DataLoader(TensorDataset(X[:30], y[:30]), batch_size=10))
    return la, DataLoader(TensorDataset(X[30:], y[30:]), batch_size=4)


def _grid_choice(la, val, score):
    """Brute force: the first grid point with the lowest score."""
    scores = []
    for prior in torch.logspace(-2, 2, 5):
        la.prior_precision = float(prior)
        scores.append((score(la, val), float(prior)))
    return min(scores, key=lambda pair: pair[0])[1]


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_gridsearch_with_torchmetrics_mse(pred_type):
    la, val = _fitted("regression", 2)

    def by_hand(la, val):
        torch.manual_seed(0)
        errors = []
        for X, y in val:
            f_mu, _ = la(X, pred_type=pred_type, link_approx="mc", n_samples=5)
            errors.append((f_mu - y) ** 2)
        return float(torch.cat(errors).mean())

    expected = _grid_choice(la, val, by_hand)
    torch.manual_seed(0)
    la.optimize_prior_precision(
        method="gridsearch",
        pred_type=pred_type,
        link_approx="mc",
        val_loader=val,
        loss=torchmetrics.MeanSquaredError(num_outputs=2),
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=5,
        n_samples=5,
    )
    assert float(la.prior_precision) == pytest.approx(expected, rel=1e-12)


def test_gridsearch_with_torchmetrics_calibration_error():
    la, val = _fitted("classification", 3)
    metric = torchmetrics.classification.MulticlassCalibrationError(
        num_classes=3, n_bins=4
    )

    def by_hand(la, val):
        probs = torch.cat([la(X) for X, _ in val])
        targets = torch.cat([y for _, y in val])
        ece_ref, _ = _naive_ece_mce(probs, targets, 4)
        return round(ece_ref, 5)  # float32 inside torchmetrics: compare coarsely

    expected = _grid_choice(la, val, by_hand)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        loss=metric,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
        grid_size=5,
    )
    assert float(la.prior_precision) == pytest.approx(expected, rel=1e-12)


def test_validate_scores_on_the_metric_device():
    from laplace.utils import validate

    la, val = _fitted("classification", 3)

    class Recorder:
        """A running metric that lives on the meta device."""

        device = torch.device("meta")

        def reset(self):
            self.devices = []

        def update(self, probs, targets):
            self.devices.append((probs.device.type, targets.device.type))

        def compute(self):
            return torch.tensor([1.0, 3.0])  # one value per output: averaged

    recorder = Recorder()
    assert validate(la, val, recorder) == 2.0
    assert recorder.devices == [("meta", "meta")] * len(val)


def test_gridsearch_default_losses_are_torchmetrics(monkeypatch):
    from laplace.utils import validation_score as validation

    seen = []
    original = validation.validate

    def spy(la, val_loader, loss, *args, **kwargs):
        seen.append(loss)
        return original(la, val_loader, loss, *args, **kwargs)

    monkeypatch.setattr("laplace.tuning.validate", spy)
    for likelihood, expected in [
        ("classification", RunningNLLMetric),
        ("regression", torchmetrics.MeanSquaredError),
    ]:
        la, val = _fitted(likelihood, 2)
        la.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=2)
        assert isinstance(seen[-1], expected) and isinstance(
            seen[-1], torchmetrics.Metric
        )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

_P = torch.full((3, 2), 0.5)
_T = torch.tensor([0, 1, 0])


@pytest.mark.parametrize(
    "fn", [accuracy, nll, brier_score, ece, mce, reliability_diagram_data]
)
@pytest.mark.parametrize(
    ("probs", "targets", "match"),
    [
        (_P, _T[:2], "targets must have shape"),
        (_P[0], _T, "probs must have shape"),
        (torch.empty(0, 2), torch.empty(0, dtype=torch.long), "non-empty"),
        (_P, _T.float(), "integer"),
        (_P, torch.tensor([0, 2, 0]), r"class indices in \[0, 1\]"),
        (torch.randn(3, 2) - 2, _T, "logits"),
    ],
)
def test_classification_metrics_reject_bad_inputs(fn, probs, targets, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, targets)


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True])
def test_calibration_rejects_bad_n_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        ece(_P, _T, n_bins=n_bins)


@pytest.mark.parametrize(
    ("scores_in", "scores_out", "match"),
    [
        (torch.empty(0), torch.ones(2), "scores_in"),
        (torch.ones(2), torch.empty(0), "scores_out"),
        (torch.ones(2, 1), torch.ones(2), "scores_in"),
        (torch.tensor([math.nan]), torch.ones(2), "NaN"),
    ],
)
def test_ood_auroc_rejects_bad_inputs(scores_in, scores_out, match):
    with pytest.raises(ValueError, match=match):
        ood_auroc(scores_in, scores_out)


def test_gaussian_nll_rejects_bad_inputs():
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="var must have the same shape"):
        gaussian_nll(x, torch.ones(3), x)
    with pytest.raises(ValueError, match="targets must have the same shape"):
        gaussian_nll(x, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-empty"):
        gaussian_nll(torch.empty(0), torch.empty(0), torch.empty(0))
    with pytest.raises(ValueError, match="strictly positive"):
        gaussian_nll(x, torch.zeros(3, 2), x)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_running_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="targets must have shape"):
        RunningNLLMetric().update(_P, _T[:2])
    with pytest.raises(ValueError, match="integer"):
        RunningNLLMetric().update(_P, _T.float())
    with pytest.raises(ValueError, match="same shape"):
        RunningMSEMetric().update(torch.ones(3, 1), torch.ones(3))
    metric = RunningNLLMetric()
    with pytest.raises(RuntimeError, match="before any"):
        metric.compute()
    metric.update(_P[:1], torch.tensor([-100]))
    with pytest.raises(RuntimeError, match="non-ignored"):
        metric.compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_follow_cuda_device():
    probs, targets = _random_classification(64, 4, torch.float64)
    metric = RunningNLLMetric().to("cuda")
    metric.update(probs.cuda(), targets.cuda())
    assert metric.compute().device.type == "cuda"
    # a metric left on the CPU accumulates CUDA batches on the CPU
    on_cpu = RunningNLLMetric()
    on_cpu.update(probs.cuda(), targets.cuda())
    assert on_cpu.compute().device.type == "cpu"
    assert float(on_cpu.compute()) == pytest.approx(float(metric.compute()), 1e-12)
    for fn in [accuracy, nll, brier_score, ece, mce]:
        assert fn(probs.cuda(), targets.cuda()) == pytest.approx(
            fn(probs, targets), rel=RTOL_TM
        )
    s_in, s_out = probs[:30, 0].round(decimals=1), probs[30:, 0].round(decimals=1)
    assert ood_auroc(s_in.cuda(), s_out.cuda()) == ood_auroc(s_in, s_out)


# ---------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reliability_diagram(tmp_path):
    import matplotlib.pyplot as plt

    probs, targets = _random_classification(100, 3, torch.float32)
    ax = plot_reliability_diagram(probs, targets, n_bins=10, label="map")
    assert isinstance(ax, matplotlib.axes.Axes)
    assert len(ax.containers) == 1 and len(ax.containers[0].patches) == 10
    assert len(ax.lines) == 1
    # Overlaying a second model adds bars but not a second diagonal.
    plot_reliability_diagram(probs, targets, n_bins=10, ax=ax)
    assert len(ax.containers) == 2 and len(ax.lines) == 1
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1].startswith("map (ECE = ")
    ax.figure.savefig(tmp_path / "reliability.png")
    _assert_png(tmp_path / "reliability.png")
    plt.close(ax.figure)


def test_plot_regression_band(tmp_path):
    import matplotlib.pyplot as plt

    x_train = torch.linspace(-1, 1, 8).unsqueeze(-1)
    x_test = torch.tensor([0.5, -1.0, 1.0, 0.0])
    mean, std = x_test.sin(), torch.full((4,), 0.1)
    _, ax = plt.subplots()
    out = plot_regression_band(
        x_train, x_train.sin(), x_test, mean, std, ax=ax, n_std=3, title="toy"
    )
    assert out is ax
    assert len(ax.lines) == 1 and len(ax.collections) == 2
    line_x, line_y = ax.lines[0].get_data()
    assert list(line_x) == sorted(x_test.tolist())
    torch.testing.assert_close(torch.as_tensor(line_y), torch.as_tensor(line_x).sin())
    assert ax.get_title() == "toy"
    ax.figure.savefig(tmp_path / "band.png")
    _assert_png(tmp_path / "band.png")
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="n_std"):
        plot_regression_band(x_train, x_train, x_test, mean, std, n_std=0)
    with pytest.raises(ValueError, match="mean and std"):
        plot_regression_band(x_train, x_train, x_test, mean[:3], std)


def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install laplace-ng\[plot\]"):
        plot_reliability_diagram(_P, _T)


def test_import_laplace_does_not_import_torchmetrics():
    # torchmetrics takes seconds to import; it loads with the first metric
    import subprocess

    code = (
        "import sys, laplace, laplace.utils; "
        "assert 'torchmetrics' not in sys.modules; "
        "from laplace.utils import RunningNLLMetric; "
        "assert 'torchmetrics' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
