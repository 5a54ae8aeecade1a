"""Pure helper logic of the benchmark scripts (benchmarks/): log-log slopes, the
generated docs block, scaling points, floor bookkeeping, worker output parsing.
The benchmarks themselves are not run here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness  # noqa: E402
import scaling  # noqa: E402
import slopes  # noqa: E402
import workloads  # noqa: E402


# ---- slopes ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [-0.5, 0.0, 1.0, 2.0, 3.0])
def test_loglog_slope_recovers_power_law(k):
    xs = [10, 20, 40, 80, 160]
    ys = [3.7 * x**k for x in xs]
    assert slopes.loglog_slope(xs, ys) == pytest.approx(k, abs=1e-12)


def test_loglog_slope_is_least_squares():
    # log y = [0, 1, 3] at log x = [0, 1, 2]: least-squares slope 1.5
    xs = [1.0, math.e, math.e**2]
    ys = [1.0, math.e, math.e**3]
    assert slopes.loglog_slope(xs, ys) == pytest.approx(1.5, abs=1e-12)


def test_loglog_slope_tail_uses_largest_sizes():
    # constant overhead at small sizes, linear at large ones: the tail sees 1
    xs = [1, 2, 4, 100, 200, 400]
    ys = [5.0, 5.0, 5.0, 100.0, 200.0, 400.0]
    assert slopes.loglog_slope(xs, ys, last=3) == pytest.approx(1.0, abs=1e-12)
    assert slopes.loglog_slope(xs, ys) < 1.0
    # unsorted input gives the same answer
    assert slopes.loglog_slope(xs[::-1], ys[::-1], last=3) == pytest.approx(1.0)


def test_loglog_slope_leaves_out_missing_and_nonpositive():
    xs = [1, 2, 4, 8]
    ys = [1.0, None, 0.0, 64.0]
    assert slopes.loglog_slope(xs, ys) == pytest.approx(2.0, abs=1e-12)
    assert slopes.loglog_slope(xs, [None, 1.0, None, None]) is None
    assert slopes.loglog_slope([2, 2], [1.0, 3.0]) is None


@pytest.mark.parametrize(
    "xs, ys, kwargs, match",
    [
        ([1, 2], [1.0], {}, "length"),
        ([0, 2], [1.0, 2.0], {}, "positive"),
        ([1, 2], [1.0, 2.0], {"last": 1}, "last"),
    ],
)
def test_loglog_slope_rejects_bad_input(xs, ys, kwargs, match):
    with pytest.raises(ValueError, match=match):
        slopes.loglog_slope(xs, ys, **kwargs)


def test_format_slope():
    assert slopes.format_slope(None, None) == "-"
    assert slopes.format_slope(1.0, None) == "1.00"
    assert slopes.format_slope(1.234, 0.987) == "1.23 (0.99)"


def test_replace_block_keeps_everything_else():
    text = "head\n<!-- x:start -->\nold\n<!-- x:end -->\ntail\n"
    out = slopes.replace_block(text, "x", "new\n")
    assert out == "head\n<!-- x:start -->\nnew\n<!-- x:end -->\ntail\n"
    assert slopes.replace_block(out, "x", "new") == out  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "no markers",
        "<!-- x:start --> <!-- x:start --> <!-- x:end -->",
        "<!-- x:end --> <!-- x:start -->",
    ],
)
def test_replace_block_rejects_bad_markers(text):
    with pytest.raises(ValueError, match="x:"):
        slopes.replace_block(text, "x", "new")


# ---- scaling points --------------------------------------------------------------------
def _mlp(point: scaling.Point) -> nn.Module:
    return nn.Sequential(
        nn.Linear(point.d_in, point.width),
        nn.ReLU(),
        nn.Linear(point.width, point.width),
        nn.ReLU(),
        nn.Linear(point.width, point.classes),
    )


@pytest.mark.parametrize("structure", scaling.STRUCTURES)
@pytest.mark.parametrize("axis", scaling.AXES)
def test_point_sizes_and_parameter_count(axis, structure):
    base = scaling.Base(
        n=100, width=12, classes=5, batch=16, d_in=7, n_test=30, full_width=6
    )
    point = scaling.make_point(axis, 40, structure, base)
    assert getattr(point, axis) == 40
    for other in set(scaling.AXES) - {axis}:
        expected = getattr(base, other)
        if other == "width" and structure.endswith("/full"):
            expected = base.full_width
        assert getattr(point, other) == expected
    # the predictive runs on N points on the N axis, else on n_test points
    assert point.n_test == (40 if axis == "n" else base.n_test)
    assert point.ops == (("fit",) if axis == "batch" else ("fit", "glm"))
    # parameter count against the model the worker builds
    model = _mlp(point)
    last = model[-1] if point.subset == "last_layer" else model
    assert point.n_params == sum(p.numel() for p in last.parameters())


def test_make_point_rejects_unknown_axis():
    with pytest.raises(ValueError, match="axis"):
        scaling.make_point("depth", 3, "all/kron", scaling.Base())


def test_infeasible_only_limits_full_structures():
    base = scaling.Base(width=64, full_width=64, d_in=64, classes=10)
    big = scaling.make_point("width", 64, "all/full", base)
    assert big.n_params > 1000
    assert "max-full-params" in scaling.infeasible(big, 1000)
    assert scaling.infeasible(big, big.n_params) is None
    kron = scaling.make_point("width", 64, "all/kron", base)
    assert scaling.infeasible(kron, 1000) is None


# ---- floor bookkeeping -----------------------------------------------------------------
@pytest.mark.parametrize(
    "config, op",
    [
        ("mlp-clf-6k/last_layer/kron", "fwd"),
        ("cnn-clf/last_layer/full", "fwd"),
        ("mlp-clf/all/kron", "fwd+Cbwd"),
        ("cnn-clf-4k/all/diag", "fwd+Cbwd"),
        ("mlp-reg/all/full", "fwd+Cbwd"),
    ],
)
def test_floor_op(config, op):
    assert workloads.floor_op(config) == op
    assert workloads.floor_config(config) == config.split("/")[0] + "/floor"


def test_floor_multiple():
    assert workloads.floor_multiple(3.0, 2.0) == 1.5
    assert workloads.floor_multiple(None, 2.0) is None
    assert workloads.floor_multiple(3.0, None) is None
    assert workloads.floor_multiple(3.0, 0.0) is None


def test_fit_only_workloads_have_the_issue_sizes():
    mlp, cnn = workloads.WORKLOADS["mlp-clf-6k"], workloads.WORKLOADS["cnn-clf-4k"]
    assert (mlp.n_train, mlp.architecture, mlp.fit_only) == (6000, "mlp-clf", True)
    assert (cnn.n_train, cnn.architecture, cnn.fit_only) == (4000, "cnn-clf", True)
    same = workloads.WORKLOADS["mlp-clf"].model()
    assert [p.shape for p in mlp.model().parameters()] == [
        p.shape for p in same.parameters()
    ]
    configs = [c for c in workloads.CONFIGS if c.startswith(("mlp-clf-6k", "cnn-"))]
    assert "mlp-clf-6k/all/full" not in configs
    assert "cnn-clf-4k/last_layer/kron" in configs


def test_floor_functions_count_passes_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))
    X, y = torch.randn(10, 3), torch.randint(5, (10,))
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # 3 batches
    before = [p.detach().clone() for p in model.parameters()]
    backward_calls = []
    model[2].register_full_backward_hook(lambda *_: backward_calls.append(1))
    funcs = workloads.floor_functions(model, loader, "classification")
    assert set(funcs) == set(workloads.FLOOR_OPS)
    expected_passes = {"fwd": 0, "fwd+bwd": 3, "fwd+Cbwd": 3 * 5}
    for op, passes in expected_passes.items():
        backward_calls.clear()
        funcs[op]()
        assert len(backward_calls) == passes, op
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


# ---- worker output ---------------------------------------------------------------------
def test_parse_rows_skips_noise_and_cut_lines():
    out = 'warning\n{"op": "fit", "median_s": 1}\n{"op": "glm", "med\n'
    assert harness.parse_rows(out) == [{"op": "fit", "median_s": 1}]


def test_run_worker_keeps_rows_of_a_stopped_worker(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(
        "import json, time\n"
        "print(json.dumps({'op': 'fit', 'median_s': 0.1}), flush=True)\n"
        "time.sleep(30)\n"
    )
    result = harness.run_worker(sys.executable, script, [], ours=False, timeout=1)
    assert result.status == "timeout"
    assert result.rows == [{"op": "fit", "median_s": 0.1}]
    assert result.wall_s < 10


def test_run_worker_reports_a_crash(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("raise SystemExit('broken on purpose')\n")
    result = harness.run_worker(sys.executable, script, [], ours=True)
    assert result.status == "crashed"
    assert "broken on purpose" in result.message


def test_worker_env_selects_the_library():
    assert harness.worker_env(ours=True)["PYTHONPATH"] == str(harness.REPO)
    assert "PYTHONPATH" not in harness.worker_env(ours=False)
