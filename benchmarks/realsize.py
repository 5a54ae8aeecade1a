"""Real-size networks: WideResNet-16-4 (2.7M parameters; or a ResNet-18, 11.2M) on
3x32x32 inputs and MiniLM-L6 with LoRA on query/value. Last-layer Kron and full,
all-weights Kron and diagonal fits, the GLM predictive, peak memory, and each fit
as a multiple of its floor; this library vs another interpreter (laplace-torch 0.3).

Usage::

    python benchmarks/realsize.py                                 # ours only
    python benchmarks/realsize.py --compare /tmp/lt/bin/python --readme
    python benchmarks/realsize.py --workloads wrn16-4 --configs all/diag --tiny

Random weights and random data (timings do not depend on the values). The CNN
batches are ``(N, 3, 32, 32)`` images; the MiniLM batches token ids ``(N, seq)``
(no padding). "All weights" means the parameters that require gradients: every
parameter of the CNN (BatchNorm included: a library that cannot cover them reports
the error), the LoRA weights and the new head of MiniLM. Each (network,
configuration) runs in a fresh worker per library with a wall-clock limit
(``--limit``) and an address-space limit (``--mem-limit``). ``--readme`` writes the
table into ``benchmarks/README.md``.

The other interpreter usually lacks transformers and peft: its MiniLM worker
appends this interpreter's site-packages to ``sys.path`` (after its own, so its
own torch and laplace come first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import (
    emit,
    library_version,
    measure,
    run_worker,
    set_threads,
    site_packages,
    stop_workers_on_sigterm,
)
from laplace_ops import fit_and_glm, run_ops
from slopes import replace_block
from workloads import FLOOR_OPS, floor_functions, floor_multiple, floor_op

HERE = Path(__file__).resolve().parent
WORKLOADS = ("wrn16-4", "resnet18", "minilm-lora")
CONFIGS = ("last_layer/kron", "last_layer/full", "all/kron", "all/diag")
OPS = ("fit", "glm")


# ---- worker ----------------------------------------------------------------------------
def build(spec: dict):
    """Model (eval mode), train loader and test inputs of ``spec``."""
    import realsize_models as models
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n, n_test = spec["n"], spec["n_test"]
    if spec["workload"] == "minilm-lora":
        model, vocab = models.minilm_lora(spec["text_classes"], spec["lora_rank"])
        classes = spec["text_classes"]
        # ids above the special tokens; every sequence is full length
        X = torch.randint(1000, vocab, (n + n_test, spec["seq_len"]), generator=gen)
    else:
        classes = spec["classes"]
        if spec["workload"] == "wrn16-4":
            model = models.WideResNet(spec["depth"], spec["widen"], classes)
        else:
            model = models.ResNet18(classes)
        X = torch.randn(n + n_test, 3, 32, 32, generator=gen)
    y = torch.randint(classes, (n,), generator=gen)
    model.eval()  # BatchNorm with running statistics, no dropout
    loader = DataLoader(TensorDataset(X[:n], y), batch_size=spec["batch"])
    return model, loader, X[n:]


def run_spec(spec: dict, ops: list[str], args) -> None:
    """Measure ``ops`` of ``spec["config"]`` (or the floor); one JSON row each."""
    info = {"laplace": library_version()}
    try:
        model, loader, X_test = build(spec)
    except Exception as err:
        emit({**info, "op": "setup", "error": repr(err)[:300]})
        return
    if spec["config"] == "floor":
        funcs = floor_functions(model, loader, "classification")
        for op in FLOOR_OPS:
            emit({**info, "op": op, **measure(funcs[op], "cpu", 1, args.budget)})
        return

    subset, structure = spec["config"].split("/")
    funcs, fitted = fit_and_glm(
        model, loader, X_test, subset, structure, warm_up=args.warm_up
    )
    run_ops(funcs, fitted, ops, args.repeats, args.budget)


# ---- driver ----------------------------------------------------------------------------
def measure_spec(python: str, spec: dict, args, *, ours: bool) -> dict[str, dict]:
    """``{op: row}`` of ``spec`` from a fresh worker under ``python``."""
    worker_args = ["--spec", json.dumps(spec), "--ops", *args.ops]
    worker_args += ["--repeats", str(args.repeats), "--budget", str(args.budget)]
    worker_args += ["--threads", str(args.threads)]
    worker_args += ["--warm-up" if args.warm_up else "--no-warm-up"]
    if spec["workload"] == "minilm-lora" and not ours:
        worker_args += ["--extra-path", site_packages(sys.executable)]
    result = run_worker(
        python,
        HERE / "realsize.py",
        worker_args,
        ours=ours,
        timeout=args.limit or None,
        mem_limit_gb=args.mem_limit or None,
    )
    rows = {row.pop("op"): row for row in result.rows}
    if result.status != "ok":
        wanted = FLOOR_OPS if spec["config"] == "floor" else args.ops
        missing = [op for op in wanted if op not in rows]
        rows[missing[0] if missing else "setup"] = {
            "error": f"{result.status}: {result.message}"
        }
    return rows


def _time(row: dict | None) -> float | None:
    return None if not row or "error" in row else row["median_s"]


def _progress(row: dict | None) -> str:
    if not row:
        return "-"
    if "error" in row:
        return "error " + row["error"][:100]
    return f"{row['median_s']:.3f} s {row['peak_mb']:.0f} MB"


def _ratio(theirs: dict | None, ours: dict | None, key: str) -> str:
    if not theirs or not ours or "error" in theirs or "error" in ours:
        return "-"
    if key == "peak_mb" and ours[key] < 1:
        # below 1 MB the measure means "no new memory": a lower bound at most
        return f">={theirs[key]:.0f}x" if theirs[key] >= 1 else "-"
    return f"{theirs[key] / ours[key]:.1f}x" if ours[key] > 0 else "-"


def table(results: list[dict], compare: bool) -> str:
    """Markdown table of the results; errors as numbered notes below it."""
    head = ["network", "config", "op", "ours s", "ours MB", "ours x floor"]
    if compare:
        head += ["laplace-torch s", "laplace-torch MB", "laplace-torch x floor"]
        head += ["speed-up", "mem ratio"]
    lines = [head, ["---"] * len(head)]
    notes: list[str] = []

    def cell(row: dict | None, key: str) -> str:
        if row is None or ("error" in row and key != "median_s"):
            return "-"
        if "error" in row:  # one note per row, in the time column
            if row["error"] not in notes:
                notes.append(row["error"])
            return f"error [{notes.index(row['error']) + 1}]"
        return f"{row[key]:.3f}" if key == "median_s" else f"{row[key]:.0f}"

    for res in results:
        floor = res["floor"]
        for op in ("setup", *FLOOR_OPS, *OPS):
            mine, other = res["ours"].get(op), res["theirs"].get(op)
            if mine is None and other is None:
                continue
            ref = None  # floor rows: multiples of the forward epoch
            if res["config"] == "floor":
                ref = _time(floor.get("fwd"))
            elif op == "fit":
                ref = _time(floor.get(floor_op(f"{res['workload']}/{res['config']}")))

            def multiple(row, ref=ref):
                value = floor_multiple(_time(row), ref)
                return "-" if value is None else f"{value:.2f}x"

            cells = [res["workload"], res["config"], op]
            cells += [cell(mine, "median_s"), cell(mine, "peak_mb"), multiple(mine)]
            if compare:
                cells += [cell(other, "median_s"), cell(other, "peak_mb")]
                cells += [multiple(other), _ratio(other, mine, "median_s")]
                cells.append(_ratio(other, mine, "peak_mb"))
            lines.append(cells)
    text = "\n".join("| " + " | ".join(line) + " |" for line in lines)
    if notes:
        text += "\n\n" + "\n".join(f"[{i}] {note}" for i, note in enumerate(notes, 1))
    return text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="PYTHON", help="second interpreter")
    parser.add_argument(
        "--workloads", nargs="+", default=["wrn16-4", "minilm-lora"], choices=WORKLOADS
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--n", type=int, default=256, help="training points")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=64, help="GLM predictive points")
    parser.add_argument("--classes", type=int, default=10, help="CNN classes")
    parser.add_argument("--depth", type=int, default=16, help="WideResNet depth")
    parser.add_argument("--widen", type=int, default=4, help="WideResNet width k")
    parser.add_argument("--text-classes", type=int, default=4, help="MiniLM classes")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="smoke-run sizes")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit one batch before the measured fit (lazy imports, first-call "
        "allocations) so that they do not count as its peak memory",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per op")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--limit", type=float, default=900, help="seconds per worker (0: none)"
    )
    parser.add_argument(
        "--mem-limit", type=float, default=16, help="GB address space per worker"
    )
    parser.add_argument("--json", default=str(HERE / "output" / "realsize.json"))
    parser.add_argument(
        "--readme", action="store_true", help="write the table into the README"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--extra-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.extra_path:
            sys.path.append(args.extra_path)  # after the interpreter's own packages
        set_threads(args.threads)
        run_spec(json.loads(args.spec), args.ops, args)
        return
    stop_workers_on_sigterm()

    if args.tiny:
        args.n, args.batch, args.n_test, args.seq_len = 16, 8, 4, 8
    sizes = {k: getattr(args, k) for k in ("n", "batch", "n_test", "classes")}
    sizes |= {k: getattr(args, k) for k in ("depth", "widen", "text_classes")}
    sizes |= {"seq_len": args.seq_len, "lora_rank": args.lora_rank}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    results = []
    for workload in args.workloads:
        spec = {"workload": workload, **sizes}
        floor = measure_spec(
            sys.executable, {**spec, "config": "floor"}, args, ours=True
        )
        results.append(
            {
                "workload": workload,
                "config": "floor",
                "floor": floor,
                "ours": floor,
                "theirs": {},
            }
        )
        for config in args.configs:
            point = {**spec, "config": config}
            ours = measure_spec(sys.executable, point, args, ours=True)
            theirs = {}
            if args.compare:
                theirs = measure_spec(args.compare, point, args, ours=False)
            results.append(
                {
                    "workload": workload,
                    "config": config,
                    "floor": floor,
                    "ours": ours,
                    "theirs": theirs,
                }
            )
            for op in args.ops:
                got = [_progress(side.get(op)) for side in (ours, theirs)]
                print(f"{workload} {config} {op}: {' / '.join(got)}", flush=True)
            Path(args.json).write_text(json.dumps({"sizes": sizes, "results": results}))
    text = table(results, bool(args.compare))
    print(text)
    if args.readme:
        readme = HERE / "README.md"
        readme.write_text(replace_block(readme.read_text(), "realsize", text))
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
