"""Report of a ``scaling.py`` run: measured log-log slopes beside the expected
ones (markdown tables) and log-log plots (matplotlib), optionally written into
``docs/scaling.md`` and ``docs/img/``.

A record (one per axis value, structure, library and operation) carries
``median_s`` and ``peak_mb``, or ``error`` / ``skipped``.
"""

from __future__ import annotations

from pathlib import Path

from slopes import format_slope, loglog_slope, replace_block

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"

AXIS_LABELS = {
    "n": "N (training points; GLM: predicted points)",
    "width": "P (hidden width)",
    "classes": "C (classes)",
    "batch": "batch size",
}
QUANTITIES = {  # (operation, record key, label)
    "fit time": ("fit", "median_s", "fit time [s]"),
    "GLM time": ("glm", "median_s", "GLM predictive time [s]"),
    "fit memory": ("fit", "peak_mb", "fit peak memory [MB]"),
    "GLM memory": ("glm", "peak_mb", "GLM predictive peak memory [MB]"),
}
# Below 1 MB the RSS measure shows the allocator, not the algorithm (memory reused
# from earlier operations): such points are left out of memory slopes.
MIN_MEMORY_MB = 1.0
TAIL_POINTS = 3
PLOT_FLOOR = {"median_s": 1e-5, "peak_mb": 0.1}

_STRUCTS = (
    "all/full",
    "all/kron",
    "all/diag",
    "last_layer/full",
    "last_layer/kron",
    "last_layer/diag",
)


def _per_structure(*values: str) -> dict[str, str]:
    return dict(zip(_STRUCTS, values))


# Expected exponents (docs/scaling.md explains each). p: parameters under the
# posterior (all weights: ~P^2; last layer: ~P C).
EXPECTED: dict[str, dict[str, dict[str, str]]] = {
    "n": {
        "fit time": _per_structure(*["1"] * 6),
        "GLM time": _per_structure(*["1"] * 6),
        "fit memory": _per_structure(*["0"] * 6),
        "GLM memory": _per_structure(*["<= 1"] * 6),
    },
    "width": {
        "fit time": _per_structure("4-6", "2-3", "2", "2-3", "2-3", "2"),
        "GLM time": _per_structure("4", "2", "2", "2", "2", "2"),
        "fit memory": _per_structure("4", "2", "2", "2", "2", "<= 2"),
        "GLM memory": _per_structure(*["<= 2"] * 6),
    },
    "classes": {
        "fit time": _per_structure("1-3", "1", "1", "2-3", "1-2", "1"),
        "GLM time": _per_structure("2-3", "1-2", "1-2", "2", "1-2", "1"),
        "fit memory": _per_structure("<= 2", "<= 2", "<= 1", "2", "<= 2", "1"),
        "GLM memory": _per_structure(*["<= 2"] * 6),
    },
    "batch": {
        "fit time": _per_structure(*["0"] * 6),
        "fit memory": _per_structure(*["<= 1"] * 6),
    },
}


def series(
    records: list[dict],
    axis: str,
    structure: str,
    lib: str,
    op: str,
    key: str,
    min_memory: float = MIN_MEMORY_MB,
) -> tuple[list[float], list[float | None]]:
    """Sizes and measurements of one curve (``None`` where there is none, and
    where a peak memory is below ``min_memory`` MB)."""
    xs, ys = [], []
    for rec in records:
        if (rec["axis"], rec["structure"], rec["lib"], rec["op"]) != (
            axis,
            structure,
            lib,
            op,
        ):
            continue
        y = rec.get(key)
        if key == "peak_mb" and y is not None and y < min_memory:
            y = None
        xs.append(rec["value"])
        ys.append(y)
    return xs, ys


def slope_cell(records, axis, structure, lib, quantity) -> str:
    op, key, _ = QUANTITIES[quantity]
    xs, ys = series(records, axis, structure, lib, op, key)
    if not xs:
        return "-"
    tail = None  # the slope of the largest sizes, where there are more points
    if sum(y is not None and y > 0 for y in ys) > TAIL_POINTS:
        tail = loglog_slope(xs, ys, last=TAIL_POINTS)
    return format_slope(loglog_slope(xs, ys), tail)


def slope_tables(records: list[dict]) -> str:
    """Markdown: per axis, the measured slopes beside the expected ones."""
    libs = sorted({r["lib"] for r in records}, key=lambda lib: lib != "ours")
    out = []
    for axis, expected in EXPECTED.items():
        if not any(r["axis"] == axis for r in records):
            continue
        structures = [s for s in _STRUCTS if any(r["structure"] == s for r in records)]
        out.append(f"### Against {AXIS_LABELS[axis]}\n")
        ops = {r["op"] for r in records if r["axis"] == axis}
        for group in (("fit time", "GLM time"), ("fit memory", "GLM memory")):
            cols = [q for q in group if q in expected and QUANTITIES[q][0] in ops]
            if not cols:
                continue
            head = ["structure"]
            for q in cols:
                head += [f"{q}: expected", *(f"{q}: {lib}" for lib in libs)]
            lines = [" | ".join(head), " | ".join("---" for _ in head)]
            for structure in structures:
                cells = [structure]
                for q in cols:
                    cells.append(expected[q][structure])
                    cells += [
                        slope_cell(records, axis, structure, lib, q) for lib in libs
                    ]
                lines.append(" | ".join(cells))
            out.append("\n".join(f"| {line} |" for line in lines) + "\n")
    return "\n".join(out)


def skipped_points(records: list[dict]) -> list[str]:
    """One line per curve with points left out, naming the sizes and why."""
    groups: dict[tuple, list] = {}
    for rec in records:
        if "skipped" in rec:
            key = (rec["axis"], rec["structure"], rec["lib"], rec["op"], rec["skipped"])
            groups.setdefault(key, []).append(rec["value"])
    return [
        f"{structure} {lib} {op} at {axis} = {', '.join(map(str, values))}: {why}"
        for (axis, structure, lib, op, why), values in groups.items()
    ]


def plot_axis(records: list[dict], axis: str, path: Path) -> bool:
    """Log-log plots of ``axis`` (one panel per quantity); ``False`` if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in records if r["axis"] == axis]
    quantities = [
        q for q in QUANTITIES if any(r["op"] == QUANTITIES[q][0] for r in rows)
    ]
    if not quantities:
        return False
    libs = sorted({r["lib"] for r in rows}, key=lambda lib: lib != "ours")
    styles = {lib: ("-", "o") if i == 0 else ("--", "x") for i, lib in enumerate(libs)}
    colors = dict(zip(_STRUCTS, plt.get_cmap("tab10").colors))
    ncols = 2
    nrows = (len(quantities) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 4.2 * nrows), squeeze=False)
    for ax, quantity in zip(axes.flat, quantities):
        op, key, label = QUANTITIES[quantity]
        for structure in _STRUCTS:
            for lib in libs:
                # memory: every point, small ones shown at the plot's floor
                xs, ys = series(rows, axis, structure, lib, op, key, min_memory=0)
                pts = [
                    (x, max(y, PLOT_FLOOR[key]))
                    for x, y in zip(xs, ys)
                    if y is not None
                ]
                if not pts:
                    continue
                line, marker = styles[lib]
                ax.plot(
                    *zip(*pts),
                    line,
                    marker=marker,
                    color=colors[structure],
                    label=f"{structure} ({lib})",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        values = sorted({r["value"] for r in rows})
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel(label)
        if key == "peak_mb":
            ax.set_title(f"below {PLOT_FLOOR[key]} MB drawn at it", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(quantities) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=3,
        fontsize=8,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.suptitle(
        f"Cost against {AXIS_LABELS[axis]} (solid: ours, dashed: "
        f"{libs[-1] if len(libs) > 1 else '-'})"
    )
    fig.tight_layout(rect=(0, 0.06 + 0.02 * len(libs), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    records: list[dict], *, docs: bool = False, img_dir: str | None = None
) -> str:
    """Print the slope tables and draw the plots; with ``docs`` also replace the
    generated block of ``docs/scaling.md``. Returns the markdown."""
    # the page links img/<name>: with docs the plots go to docs/img
    folder = DOCS / "img" if docs else Path(img_dir or HERE / "output")
    figures = []
    for axis in EXPECTED:
        path = folder / f"scaling_{axis}.png"
        if plot_axis(records, axis, path):
            figures.append((axis, path))
    errors = sorted(
        {
            f"{r['structure']} {r['lib']} {r['op']} at {r['axis']} = {r['value']}: "
            f"{r['error'][:100]}"
            for r in records
            if "error" in r
        }
    )
    text = slope_tables(records)
    if errors:
        text += "\nErrors (the larger sizes of that sweep were not run):\n\n"
        text += "\n".join(f"- {e}" for e in errors) + "\n"
    skipped = skipped_points(records)
    if skipped:
        text += "\nLeft out:\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    print(text)
    for _, path in figures:
        print(f"plot: {path}")
    if docs:
        page = DOCS / "scaling.md"
        images = "\n\n".join(
            f"![{AXIS_LABELS[axis]}](img/{path.name})" for axis, path in figures
        )
        page.write_text(
            replace_block(page.read_text(), "scaling", images + "\n\n" + text)
        )
        print(f"updated {page}")
    return text
