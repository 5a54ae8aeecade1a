"""Time fit, marginal-likelihood tuning and predictives of every Laplace
configuration in ``workloads.py``; optionally side by side with another
interpreter (e.g. a virtual environment with laplace-torch installed).

Usage::

    python benchmarks/run.py                          # this library only
    python benchmarks/run.py --compare /tmp/lt/bin/python
    python benchmarks/run.py --configs mlp-clf/all/diag --ops fit --repeats 5
    python benchmarks/run.py --configs mlp-clf-6k/last_layer/kron cnn-clf-4k/all/kron

Each configuration runs in a fresh worker process (``--worker``), so the peak
memory of one configuration does not leak into the next. Before the fits of a
workload, its floor runs (``<workload>/floor``: a forward epoch, a forward+backward
epoch and a forward epoch with one backward pass per output, plain torch on the same
model, data and batch size), and every fit is also reported as a multiple of its
floor (last-layer fits: one forward epoch; all-weights fits: forward + C backward
passes). A worker only uses the laplace-torch-compatible public API, so the same
file runs under either library (the floor runs once, under this interpreter).
Timings are medians over ``--repeats`` runs after a warm-up run (fewer when they
exceed ``--budget`` seconds; a warm-up longer than half the budget is the only
run); peak memory is measured during the warm-up run only (the timed runs go
without the sampling thread): the peak resident set size above the level before
the operation (CPU, sampled every millisecond) or ``torch.cuda.max_memory_allocated``
above the allocated memory before it (CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import (
    WorkerResult,
    emit,
    library_version,
    measure,
    run_worker,
    set_threads,
    stop_workers_on_sigterm,
)
from workloads import (
    CONFIGS,
    FLOOR_OPS,
    OPS,
    floor_config,
    floor_multiple,
    floor_op,
    operations,
)

HERE = Path(__file__).resolve().parent


# ---- worker ------------------------------------------------------------------------
def run_configs(configs: list[str], ops: list[str], args) -> None:
    """Time ``ops`` of each configuration and print one JSON line per operation
    (operations a configuration does not have are left out)."""
    for config in configs:
        info = {"config": config, "laplace": library_version()}
        try:
            funcs = operations(config, args.device)
        except Exception as err:  # report, e.g. a configuration a library lacks
            emit({**info, "op": "setup", "error": repr(err)[:200]})
            continue
        wanted = FLOOR_OPS if config.endswith("/floor") else ops
        for op in wanted:
            if op in funcs:
                result = measure(funcs[op], args.device, args.repeats, args.budget)
                emit({**info, "op": op, **result})


# ---- driver ------------------------------------------------------------------------
def run_config(python: str, config: str, args, *, ours: bool) -> dict[str, dict]:
    """``{op: row}`` of ``config`` measured in a fresh worker under ``python``."""
    worker_args = [
        "--configs",
        config,
        "--ops",
        *args.ops,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--budget",
        str(args.budget),
        "--threads",
        str(args.threads),
    ]
    result: WorkerResult = run_worker(
        python,
        HERE / "run.py",
        worker_args,
        ours=ours,
        timeout=args.timeout or None,
        mem_limit_gb=args.mem_limit or None,
    )
    rows = {row["op"]: row for row in result.rows}
    if result.status != "ok" or not rows:
        # the operation running when the worker stopped gets the reason
        reason = result.message or "no output"
        wanted = FLOOR_OPS if config.endswith("/floor") else args.ops
        missing = [op for op in wanted if op not in rows]
        key = missing[0] if rows and missing else "setup"
        rows[key] = {"error": f"{result.status}: {reason}"}
    return rows


def _fmt_time(row: dict | None) -> str:
    if row is None:
        return "-"
    return "error" if "error" in row else f"{row['median_s']:.4f}"


def _fmt_mem(row: dict | None) -> str:
    return "-" if row is None or "error" in row else f"{row['peak_mb']:.1f}"


def _ratio(theirs: dict | None, ours: dict | None, key: str) -> str:
    if not theirs or not ours or "error" in theirs or "error" in ours:
        return "-"
    if ours[key] <= 0:
        return "inf" if theirs[key] > 0 else "-"
    return f"{theirs[key] / ours[key]:.1f}x"


def _seconds(row: dict | None) -> float | None:
    return None if row is None or "error" in row else row["median_s"]


def _fmt_multiple(multiple: float | None) -> str:
    return "-" if multiple is None else f"{multiple:.2f}x"


def _print_row(cells: list[str]) -> None:
    print(" | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="PYTHON", help="second interpreter")
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per op")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per worker (0: torch's default); one thread keeps "
        "timings stable on a shared machine",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time each workload's floor and report fits as multiples of it",
    )
    parser.add_argument(
        "--floor-target",
        type=float,
        default=1.5,
        help="list the fits above this multiple of their floor at the end",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="seconds per worker (one configuration, all its ops; 0: no limit); "
        "a worker over it is stopped and its remaining ops reported as errors",
    )
    parser.add_argument(
        "--mem-limit",
        type=float,
        default=0,
        help="address-space limit per worker in GB (0: none); an allocation "
        "beyond it fails as an error instead of invoking the OOM killer",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        set_threads(args.threads)
        run_configs(args.configs, args.ops, args)
        return
    stop_workers_on_sigterm()

    head = ["config", "op", "ours s", "ours MB", "ours x floor"]
    if args.compare:
        head += ["theirs s", "theirs MB", "theirs x floor", "speed-up", "mem ratio"]
    _print_row(head)
    _print_row(["---"] * len(head))
    everything, floors, over, errors, n_fits = [], {}, [], [], 0
    for config in args.configs:
        if args.floor and "fit" in args.ops and floor_config(config) not in floors:
            # the floor is plain torch: measured once, under this interpreter
            name = floor_config(config)
            floors[name] = run_config(sys.executable, name, args, ours=True)
            everything.append({"config": name, "ours": floors[name], "theirs": {}})
            forward = _seconds(floors[name].get("fwd"))
            for op in FLOOR_OPS:
                row = floors[name].get(op)
                cells = [name, op, _fmt_time(row), _fmt_mem(row)]
                # a floor row's multiple is that of the forward epoch
                cells.append(_fmt_multiple(floor_multiple(_seconds(row), forward)))
                if row is not None and "error" in row:
                    errors.append(f"{name} {op}: {row['error']}")
                if args.compare:
                    cells += ["-"] * 5
                _print_row(cells)
        ours = run_config(sys.executable, config, args, ours=True)
        theirs = {}
        if args.compare:
            theirs = run_config(args.compare, config, args, ours=False)
        everything.append({"config": config, "ours": ours, "theirs": theirs})
        floor_row = floors.get(floor_config(config), {}).get(floor_op(config))
        for op in ["setup", *args.ops]:
            mine, other = ours.get(op), theirs.get(op)
            if mine is None and other is None:
                continue
            for side, row in (("ours", mine), ("theirs", other)):
                if row is not None and "error" in row:
                    errors.append(f"{config} {op} ({side}): {row['error']}")
            mine_x = other_x = None
            if op == "fit":
                mine_x = floor_multiple(_seconds(mine), _seconds(floor_row))
                other_x = floor_multiple(_seconds(other), _seconds(floor_row))
                n_fits += mine_x is not None
                if mine_x is not None and mine_x > args.floor_target:
                    over.append(f"{config} ({mine_x:.2f}x)")
            cells = [config, op, _fmt_time(mine), _fmt_mem(mine)]
            cells.append(_fmt_multiple(mine_x))
            if args.compare:
                cells += [
                    _fmt_time(other),
                    _fmt_mem(other),
                    _fmt_multiple(other_x),
                    _ratio(other, mine, "median_s"),
                    _ratio(other, mine, "peak_mb"),
                ]
            _print_row(cells)
    if errors:
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in errors))
    if n_fits:
        target = f"{args.floor_target:g}x"
        print(f"\n{n_fits - len(over)} of {n_fits} fits within {target} their floor")
        if over:
            print("above: " + ", ".join(over))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
