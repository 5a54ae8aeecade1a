"""Measurement harness shared by the benchmark scripts.

Two halves:

- worker side (runs under either library's interpreter, so only the standard
  library and torch): :class:`PeakMemory`, :func:`measure` (warm-up, median of
  repeats within a time budget, peak memory of the warm-up) and :func:`emit`
  (one JSON line per result on stdout);
- driver side: :func:`run_worker` starts a worker script in a fresh process under
  a given interpreter, with an optional wall-clock limit and address-space limit,
  and collects the JSON lines it printed, also when it was stopped.

The driver gives "our" worker this checkout's ``laplace`` (``PYTHONPATH`` set to the
repository root) and the other interpreter's worker a clean ``PYTHONPATH``, so that
it imports its own ``laplace``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ---- worker side ---------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the starting level while the context is open, in bytes.

    CPU: resident set size sampled every millisecond by a thread. CUDA:
    ``torch.cuda.max_memory_allocated`` above the memory allocated at entry.
    """

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


def timed(func: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of one call of ``func`` (CUDA: synchronised)."""
    import torch

    start = time.perf_counter()
    func()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    func: Callable[[], object], device: str, repeats: int, budget: float
) -> dict:
    """Median time and peak memory of ``func``.

    The first call warms up (lazy initialisation, allocator, kernels) and
    measures peak memory; its time only counts when it alone takes half the
    budget. Timed calls go without the memory poller, whose thread competes for
    the GIL and would slow millisecond operations.

    Returns
    -------
    dict
        ``{"median_s", "runs", "peak_mb"}``, or ``{"error": repr}`` when ``func``
        raised.
    """
    try:
        times: list[float] = []
        with PeakMemory(device) as mem:
            elapsed = timed(func, device)
        if elapsed > budget / 2:
            times.append(elapsed)
        while len(times) < repeats and sum(times) < budget:
            times.append(timed(func, device))
        return {
            "median_s": statistics.median(times),
            "runs": len(times),
            "peak_mb": mem.peak / 2**20,
        }
    except Exception as err:  # report, e.g. an operation a library lacks
        return {"error": repr(err)[:300]}


def emit(row: dict) -> None:
    """Print one result row as a JSON line (the driver parses these)."""
    print(json.dumps(row), flush=True)


def set_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads (0: keep torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def library_version() -> str:
    import laplace

    return getattr(laplace, "__version__", "?")


# ---- driver side ---------------------------------------------------------------------
@dataclass
class WorkerResult:
    """JSON rows a worker printed and how it ended."""

    rows: list[dict] = field(default_factory=list)
    status: str = "ok"  # "ok", "timeout" or "crashed"
    message: str = ""
    wall_s: float = 0.0


def stop_workers_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit`` in the driver, so that :func:`run_worker`
    kills the running worker (its own process group) before the driver ends."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def worker_env(ours: bool) -> dict[str, str]:
    """Environment of a worker: ours imports this checkout's ``laplace``, the
    other interpreter its own."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(REPO)
    return env


def _limit_memory(limit_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def run_worker(
    python: str,
    script: Path,
    args: list[str],
    *,
    ours: bool,
    timeout: float | None = None,
    mem_limit_gb: float | None = None,
) -> WorkerResult:
    """Run ``python script --worker *args`` in a fresh process and parse its rows.

    Parameters
    ----------
    timeout
        Wall-clock seconds; the worker's process group is killed after it and the
        rows printed so far are kept (``status="timeout"``). ``None``: no limit.
    mem_limit_gb
        Address-space limit of the worker (``RLIMIT_AS``): an allocation beyond it
        fails inside the worker (reported as an error row) instead of pushing the
        machine into its out-of-memory killer. ``None``: no limit.
    """
    cmd = [python, str(script), "--worker", *args]
    preexec = None
    if mem_limit_gb:
        preexec = _limit_memory(int(mem_limit_gb * 2**30))
    result = WorkerResult()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            env=worker_env(ours),
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=preexec,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result.status = "timeout"
            result.message = f"over the {timeout:g} s limit"
        except BaseException:  # e.g. Ctrl-C: leave no worker behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        result.wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        result.rows = parse_rows(out.read())
        stderr = err.read().strip().splitlines()
    if result.status == "ok" and proc.returncode != 0:
        result.status = "crashed"
        tail = stderr[-1:] or [f"exit status {proc.returncode}"]
        result.message = tail[0][:300]
    return result


def parse_rows(stdout: str) -> list[dict]:
    """The JSON rows among a worker's output lines (other lines are ignored)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
    return rows


def site_packages(python: str) -> str:
    """The ``purelib`` directory of interpreter ``python``."""
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=worker_env(ours=False),
    )
    return out.stdout.strip()
