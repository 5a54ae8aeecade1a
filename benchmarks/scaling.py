"""Cost curves: fit and GLM-predictive time and peak memory against the data size
N, the width P, the number of classes C and the batch size, for every Hessian
structure (full, kron, diag x all weights, last layer), this library vs another
interpreter (laplace-torch 0.3) where it runs.

Usage::

    python benchmarks/scaling.py                                 # ours only
    python benchmarks/scaling.py --compare /tmp/lt/bin/python --docs
    python benchmarks/scaling.py --axes n --structures all/kron --tiny
    python benchmarks/scaling.py --report-only benchmarks/output/scaling.json --docs

The model is an MLP ``d_in -> P -> P -> C`` (ReLU) on random data, classification.
One axis varies at a time around a base point (``--n``, ``--width``, ``--classes``,
``--batch``); the full structures use a narrower base width (``--full-width``) so
that ``P x P`` stays feasible, and a point whose posterior would exceed
``--max-full-params`` parameters is left out. The GLM predictive (probit) runs on
``--n-test`` points, on the N axis on N points; the batch axis has no predictive
(it predicts in one call).

Each point runs in a fresh worker process per library (memory isolation), ours
and theirs interleaved. A worker over ``--point-limit`` seconds is stopped; an
operation that timed out or failed is not run at the larger sizes of that sweep
(it would only be slower). Results go to ``--json`` as they come; the report
(log-log plots, measured slopes beside the expected ones, ``scaling_report.py``)
is printed, and with ``--docs`` written into ``docs/img/`` and ``docs/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import run_worker, set_threads, stop_workers_on_sigterm

HERE = Path(__file__).resolve().parent

AXES = ("n", "width", "classes", "batch")
STRUCTURES = (
    "all/full",
    "all/kron",
    "all/diag",
    "last_layer/full",
    "last_layer/kron",
    "last_layer/diag",
)
GRIDS = {
    "n": (500, 1000, 2000, 4000, 8000, 16000),
    "width": (16, 32, 64, 128, 256, 512, 1024),
    "classes": (10, 30, 100, 300, 1000),
    "batch": (16, 32, 64, 128, 256, 512),
}
# --tiny: a smoke run of the whole pipeline in about a minute per library
TINY_GRIDS = {
    "n": (64, 128, 256),
    "width": (8, 16, 32),
    "classes": (3, 6, 12),
    "batch": (16, 32, 64),
}


@dataclass(frozen=True)
class Point:
    """One measurement: a structure at one size."""

    axis: str
    value: int
    structure: str  # "<subset>/<hessian_structure>"
    n: int
    width: int
    classes: int
    batch: int
    d_in: int
    n_test: int

    @property
    def subset(self) -> str:
        return self.structure.split("/")[0]

    @property
    def hessian(self) -> str:
        return self.structure.split("/")[1]

    @property
    def n_params(self) -> int:
        """Parameters under the posterior (all weights or the last layer)."""
        w, c = self.width, self.classes
        last = w * c + c
        if self.subset == "last_layer":
            return last
        return self.d_in * w + w + w * w + w + last

    @property
    def ops(self) -> tuple[str, ...]:
        return ("fit",) if self.axis == "batch" else ("fit", "glm")


@dataclass(frozen=True)
class Base:
    """The base point every axis varies around."""

    n: int = 2000
    width: int = 128
    classes: int = 10
    batch: int = 128
    d_in: int = 64
    n_test: int = 1000
    full_width: int = 32


def make_point(axis: str, value: int, structure: str, base: Base) -> Point:
    """The point of ``structure`` with ``axis`` set to ``value``, the other sizes
    at the base (full structures: at ``base.full_width``)."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    width = base.full_width if structure.endswith("/full") else base.width
    point = Point(
        axis,
        value,
        structure,
        base.n,
        width,
        base.classes,
        base.batch,
        base.d_in,
        base.n_test,
    )
    if axis == "n":
        return replace(point, n=value, n_test=value)
    return replace(point, **{axis: value})


def infeasible(point: Point, max_full_params: int) -> str | None:
    """Why ``point`` is left out, or ``None``."""
    if point.hessian == "full" and point.n_params > max_full_params:
        return f"{point.n_params} parameters > --max-full-params {max_full_params}"
    return None


# ---- worker ----------------------------------------------------------------------------
def run_point(point: Point, ops: list[str], args) -> None:
    """Fit (and predict with) the Laplace approximation of ``point``; one JSON row
    per operation."""
    import torch
    from laplace_ops import fit_and_glm, run_ops
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(point.d_in, point.width),
        nn.ReLU(),
        nn.Linear(point.width, point.width),
        nn.ReLU(),
        nn.Linear(point.width, point.classes),
    )
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(point.n, point.d_in, generator=gen)
    y = torch.randint(point.classes, (point.n,), generator=gen)
    X_test = torch.randn(point.n_test, point.d_in, generator=gen)
    loader = DataLoader(TensorDataset(X, y), batch_size=point.batch)
    funcs, fitted = fit_and_glm(
        model, loader, X_test, point.subset, point.hessian, warm_up=args.warm_up
    )
    run_ops(funcs, fitted, ops, args.repeats, args.budget)


# ---- driver ----------------------------------------------------------------------------
def sweep(axis: str, structure: str, grid, libs: dict[str, str], args, out) -> None:
    """Measure ``structure`` along ``axis`` for every library; append records."""
    base = Base(
        args.n,
        args.width,
        args.classes,
        args.batch,
        args.d_in,
        args.n_test,
        args.full_width,
    )
    active = {lib: None for lib in libs}  # ops still worth running, per library
    for value in grid:
        point = make_point(axis, value, structure, base)
        common = {"axis": axis, "value": value, "structure": structure}
        common["n_params"] = point.n_params
        reason = infeasible(point, args.max_full_params)
        for lib, python in libs.items():
            if active[lib] is None:
                active[lib] = list(point.ops)
            if reason:
                out.extend(
                    {**common, "lib": lib, "op": op, "skipped": reason}
                    for op in point.ops
                )
                continue
            for op in point.ops:
                if op not in active[lib]:
                    why = "an earlier point of this sweep failed or timed out"
                    out.append({**common, "lib": lib, "op": op, "skipped": why})
            ops = [op for op in point.ops if op in active[lib]]
            if not ops:
                continue
            result = run_worker(
                python,
                HERE / "scaling.py",
                [
                    "--point",
                    json.dumps(asdict(point)),
                    "--ops",
                    *ops,
                    "--repeats",
                    str(args.repeats),
                    "--budget",
                    str(args.budget),
                    "--threads",
                    str(args.threads),
                    "--warm-up" if args.warm_up else "--no-warm-up",
                ],
                ours=lib == "ours",
                timeout=args.point_limit or None,
                mem_limit_gb=args.mem_limit or None,
            )
            rows = {row["op"]: row for row in result.rows}
            for op in ops:
                row = rows.get(op) or {"error": f"{result.status}: {result.message}"}
                row = {k: v for k, v in row.items() if k != "op"}
                out.append({**common, "lib": lib, "op": op, **row})
                if "error" in row:  # nothing larger is worth waiting for
                    active[lib] = [o for o in active[lib] if o != op]
                    if op == "fit":
                        active[lib] = []
                print(_progress(out[-1]), flush=True)
            Path(args.json).write_text(json.dumps(out, indent=1))


def _progress(rec: dict) -> str:
    where = f"{rec['axis']}={rec['value']} {rec['structure']} {rec['lib']} {rec['op']}"
    if "error" in rec:
        return f"{where}: error {rec['error'][:120]}"
    return f"{where}: {rec['median_s']:.4f} s, {rec['peak_mb']:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="PYTHON", help="second interpreter")
    parser.add_argument("--axes", nargs="+", default=list(AXES), choices=AXES)
    parser.add_argument(
        "--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES
    )
    parser.add_argument("--tiny", action="store_true", help="tiny grids (smoke run)")
    for axis in AXES:
        parser.add_argument(
            f"--{axis}-grid", type=int, nargs="+", help=f"values of the {axis} axis"
        )
    defaults = Base()
    parser.add_argument("--n", type=int, default=defaults.n, help="base N")
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--classes", type=int, default=defaults.classes)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--d-in", type=int, default=defaults.d_in)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--full-width", type=int, default=defaults.full_width)
    parser.add_argument("--max-full-params", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit one batch before the measured fit (lazy imports, first-call "
        "allocations) so that they do not count as its peak memory",
    )
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per op")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--point-limit", type=float, default=300, help="seconds per worker (0: none)"
    )
    parser.add_argument(
        "--mem-limit", type=float, default=16, help="GB address space per worker"
    )
    parser.add_argument("--json", default=str(HERE / "output" / "scaling.json"))
    parser.add_argument("--report-only", metavar="JSON", help="only report a run")
    parser.add_argument(
        "--docs", action="store_true", help="write plots and table into docs/"
    )
    parser.add_argument(
        "--img-dir", help="where the plots go without --docs (benchmarks/output)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--ops", nargs="+", default=["fit", "glm"])
    args = parser.parse_args()

    if args.worker:
        set_threads(args.threads)
        run_point(Point(**json.loads(args.point)), args.ops, args)
        return
    stop_workers_on_sigterm()

    from scaling_report import report

    if args.report_only:
        records = json.loads(Path(args.report_only).read_text())
        report(records, docs=args.docs, img_dir=args.img_dir)
        return
    if args.tiny:
        args.n, args.width, args.classes, args.n_test = 128, 16, 3, 64
        args.full_width = 8
    libs = {"ours": sys.executable}
    if args.compare:
        libs["laplace-torch"] = args.compare
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for axis in args.axes:
        grid = (
            getattr(args, f"{axis}_grid") or (TINY_GRIDS if args.tiny else GRIDS)[axis]
        )
        for structure in args.structures:
            sweep(axis, structure, grid, libs, args, records)
    report(records, docs=args.docs, img_dir=args.img_dir)


if __name__ == "__main__":
    main()
