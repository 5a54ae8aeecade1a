"""Pure helpers of the scaling report: log-log slopes and the generated block of a
markdown page. Standard library only (tested in ``tests/test_benchmark_helpers.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def loglog_slope(
    xs: Sequence[float], ys: Sequence[float | None], *, last: int | None = None
) -> float | None:
    """Least-squares slope of ``log y`` against ``log x``.

    Points whose ``y`` is missing (``None``) or not positive are left out.

    Parameters
    ----------
    xs, ys
        Sizes and measurements, same length.
    last
        Only use the ``last`` points with the largest ``x`` (after leaving out
        missing ones): the asymptotic slope, without the fixed overheads that
        dominate small sizes.

    Returns
    -------
    float or None
        The exponent ``k`` of the best fit ``y ~ x**k``; ``None`` when fewer than two
        points with distinct ``x`` remain.
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} != {len(ys)}")
    pairs = sorted(
        (float(x), float(y)) for x, y in zip(xs, ys) if y is not None and y > 0
    )
    if any(x <= 0 for x, _ in pairs):
        raise ValueError(f"sizes must be positive for a log-log fit, got {xs}")
    if last is not None:
        if last < 2:
            raise ValueError(f"last must be at least 2, got {last}")
        pairs = pairs[-last:]
    if len({x for x, _ in pairs}) < 2:
        return None
    lx = [math.log(x) for x, _ in pairs]
    ly = [math.log(y) for _, y in pairs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    sxy = sum((x - mx) * (y - my) for x, y in zip(lx, ly))
    return sxy / sxx


def format_slope(slope: float | None, tail: float | None) -> str:
    """``"1.02 (0.98)"``: the slope over all points and over the largest ones;
    ``"-"`` where there are too few points."""
    if slope is None:
        return "-"
    if tail is None:
        return f"{slope:.2f}"
    return f"{slope:.2f} ({tail:.2f})"


def replace_block(text: str, name: str, content: str) -> str:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->``
    in ``text`` by ``content`` (the markers stay).

    Raises
    ------
    ValueError
        When the markers are missing, repeated or out of order.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {start!r} and one {end!r} marker")
    head, rest = text.split(start)
    if end not in rest:
        raise ValueError(f"{end!r} comes before {start!r}")
    _, tail = rest.split(end)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"
