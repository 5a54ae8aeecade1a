"""Refusing allocations that cannot fit: before drawing many samples, estimate
the memory they take and compare it with what the device has available, so
that the call fails at once with the estimate and how to split the work,
instead of allocating until the process is killed."""

from __future__ import annotations

import math

import torch

__all__ = ["InsufficientMemoryError", "available_memory", "check_memory"]


class InsufficientMemoryError(MemoryError):
    """Raised before an allocation larger than the available memory."""


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or ``None`` where that is
    not known (then nothing is checked).

    CPU: ``psutil.virtual_memory().available`` when psutil is installed, else
    ``MemAvailable`` of ``/proc/meminfo``. CUDA: the free device memory plus
    what PyTorch's caching allocator holds without using it.
    """
    device = torch.device(device)
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return _meminfo_available()
        return int(psutil.virtual_memory().available)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device
        )
        return int(free + cached)
    return None


def _size(n_bytes: float) -> str:
    """``n_bytes`` in B, KiB, MiB, GiB or TiB."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n_bytes >= 1024**power:
            return f"{n_bytes / 1024**power:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def check_memory(
    what: str,
    count: int,
    bytes_per_item: int,
    device: torch.device,
    unit: str,
    advice: str,
) -> None:
    """Raise :class:`InsufficientMemoryError` when ``count`` items (samples,
    rows) of ``bytes_per_item`` bytes each need more than the available memory
    of ``device``.

    The message names ``what`` is computed, the estimate, the available memory,
    the largest ``count`` of ``unit`` that fits (half the available memory) and
    ``advice``, e.g. how to split the call.
    """
    if count <= 0:
        return
    available = available_memory(device)
    needed = count * bytes_per_item
    if available is None or needed <= available:
        return
    fits = max(0, math.floor(available / 2 / max(bytes_per_item, 1)))
    raise InsufficientMemoryError(
        f"{what} needs about {_size(needed)} ({count} {unit} of {_size(bytes_per_item)}"
        f" each) but only {_size(available)} are available on {torch.device(device)}; "
        f"at most about {fits} {unit} fit at a time. {advice}"
    )


def check_function_samples(
    n_samples: int, n_rows: int, n_outputs: int, itemsize: int, device: torch.device
) -> None:
    """Check the memory of ``functional_samples``/``predictive_samples``: the
    draws ``(n_samples, n_rows, n_outputs)`` and as many intermediate values."""
    check_memory(
        f"Drawing {n_samples} function samples at {n_rows} inputs",
        n_samples,
        2 * n_rows * n_outputs * itemsize,
        device,
        "samples",
        "Draw fewer samples per call, or pass the inputs in chunks of fewer rows "
        "and concatenate the results along dim=1.",
    )
