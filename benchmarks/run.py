"""Time fit, marginal-likelihood tuning and predictives of every Laplace
configuration in ``workloads.py``; optionally side by side with another
interpreter (e.g. a virtual environment with laplace-torch installed).

Usage::

    python benchmarks/run.py                          # this library only
    python benchmarks/run.py --compare /tmp/lt/bin/python
    python benchmarks/run.py --configs mlp-clf/all/diag --ops fit --repeats 5

Each configuration runs in a fresh worker process (``--worker``), so the peak
memory of one configuration does not leak into the next. A worker only uses the
laplace-torch-compatible public API, so the same file runs under either library.
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
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- worker ------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the starting level while the context is open, in bytes."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.high = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.high = max(self.high, _rss_bytes())

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            return
        self._stop.set()
        self._thread.join()
        self.high = max(self.high, _rss_bytes())
        self.peak = self.high - self.start


def _timed(func, device: str) -> float:
    import torch

    start = time.perf_counter()
    func()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_worker(config: str, ops: list[str], device: str, repeats: int, budget: float):
    """Time ``ops`` of ``config`` and print one JSON line per operation."""

    sys.path.insert(0, str(HERE))
    from workloads import operations

    import laplace

    info = {"config": config, "laplace": getattr(laplace, "__version__", "?")}
    try:
        funcs = operations(config, device)
    except Exception as err:  # report, e.g. a configuration a library lacks
        print(json.dumps({**info, "op": "setup", "error": repr(err)[:200]}), flush=True)
        return
    for op in ops:
        times, peak = [], 0
        try:
            # The first run warms up (lazy initialisation, allocator, kernels) and
            # measures peak memory; its time only counts when it alone takes half
            # the budget. Timed runs go without the memory poller, whose thread
            # competes for the GIL and would slow millisecond operations.
            with PeakMemory(device) as mem:
                elapsed = _timed(funcs[op], device)
            peak = mem.peak
            if elapsed > budget / 2:
                times.append(elapsed)
            while len(times) < repeats and sum(times) < budget:
                times.append(_timed(funcs[op], device))
            result = {"median_s": statistics.median(times), "runs": len(times)}
            result["peak_mb"] = peak / 2**20
        except Exception as err:
            result = {"error": repr(err)[:200]}
        print(json.dumps({**info, "op": op, **result}), flush=True)


# ---- driver ------------------------------------------------------------------------
def run_config(python: str, config: str, args) -> dict[str, dict]:
    cmd = [
        python,
        str(HERE / "run.py"),
        "--worker",
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
    # a clean path: the worker must import the interpreter's own `laplace`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["op"]] = row
    if not rows:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        rows["setup"] = {"error": tail[0][:200]}
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


def main() -> None:
    sys.path.insert(0, str(HERE))
    from workloads import CONFIGS, OPS

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
    parser.add_argument("--json", metavar="PATH", help="also write all rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        for config in args.configs:
            run_worker(config, args.ops, args.device, args.repeats, args.budget)
        return

    head = ["config", "op", "ours s", "ours MB"]
    if args.compare:
        head += ["theirs s", "theirs MB", "speed-up", "mem ratio"]
    print(" | ".join(head), flush=True)
    print(" | ".join("---" for _ in head), flush=True)
    everything = []
    for config in args.configs:
        ours = run_config(sys.executable, config, args)
        theirs = run_config(args.compare, config, args) if args.compare else {}
        everything.append({"config": config, "ours": ours, "theirs": theirs})
        for op in ["setup", *args.ops]:
            if op == "setup" and "setup" not in ours and "setup" not in theirs:
                continue
            mine, other = ours.get(op), theirs.get(op)
            cells = [config, op, _fmt_time(mine), _fmt_mem(mine)]
            if args.compare:
                cells += [
                    _fmt_time(other),
                    _fmt_mem(other),
                    _ratio(other, mine, "median_s"),
                    _ratio(other, mine, "peak_mb"),
                ]
            print(" | ".join(cells), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
