"""Plumbing shared by the hook-based backends (BackPACK and ASDL).

Both libraries work by side effects: hooks on modules, results stored as
attributes of modules or parameters, ``.grad`` accumulated by ``backward`` and
sampling from the global random number generator.  The helpers here keep
those side effects off the user's model and make sampling reproducible with a
``torch.Generator``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = [
    "ForwardRecord",
    "check_data_size",
    "import_backend",
    "record_forwards",
    "restore_attributes",
    "seeded_global_rng",
]


def import_backend(module_name: str, backend: str, install: str) -> ModuleType:
    """Import an optional dependency or fail with an actionable ImportError."""
    try:
        with warnings.catch_warnings():
            # Their imports trip torch's `torch.jit.script` deprecation warnings.
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{backend} needs the optional package {module_name!r}, which could not "
            f"be imported ({err}). Install it with `{install}`, or use the default "
            "backend CurvlinopsGGN."
        ) from err


def check_data_size(N: Any) -> int:
    """Validate the data set size ``N`` of a ``kron`` call."""
    if isinstance(N, bool) or not isinstance(N, Integral) or N < 1:
        raise ValueError(f"N (data set size) must be a positive int, got {N!r}.")
    return int(N)


@contextmanager
def restore_attributes(objects: Iterable[Any], names: Iterable[str]) -> Iterator[None]:
    """Undo plain attributes ``names`` that a library sets on ``objects``.

    Pre-existing values (say from the user's own BackPACK session) come back;
    attributes that did not exist before are deleted.
    """
    objects, names = list(objects), list(names)
    saved = [
        (obj, name, vars(obj)[name])
        for obj in objects
        for name in names
        if name in vars(obj)
    ]
    try:
        yield
    finally:
        for obj in objects:
            for name in names:
                vars(obj).pop(name, None)
        for obj, name, value in saved:
            vars(obj)[name] = value


@contextmanager
def seeded_global_rng(
    generator: torch.Generator | None, device: torch.device
) -> Iterator[None]:
    """Make library code that samples from the global RNG follow ``generator``.

    Without a generator the global RNG is used as is.  With one, a seed drawn
    from it seeds the CPU RNG and, for a CUDA ``device``, that device's RNG
    inside a fork, so the user's global RNG state is unchanged afterwards.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@dataclass
class ForwardRecord:
    """What one module saw in one forward pass."""

    calls: int = 0
    input_shapes: list[torch.Size] = field(default_factory=list)
    output_shapes: list[torch.Size] = field(default_factory=list)

    def positions(self, n_features: int) -> int:
        """Positions per sample sharing the weight: ``numel / (batch * features)``.

        For ``nn.Linear`` on `(batch, *, in)` inputs this is ``prod(*)``.
        """
        shape = self.input_shapes[-1]
        return shape.numel() // (shape[0] * n_features)

    def spatial_size(self) -> int:
        """Output positions of a convolution, ``prod(output.shape[2:])``."""
        return self.output_shapes[-1][2:].numel()


@contextmanager
def record_forwards(modules: Iterable[nn.Module]) -> Iterator[dict[int, ForwardRecord]]:
    """Record input/output shapes and call counts of ``modules`` (keyed by id).

    The hooks are removed on exit.
    """
    records: dict[int, ForwardRecord] = {}
    handles = []

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        rec = records.setdefault(id(module), ForwardRecord())
        rec.calls += 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            rec.input_shapes.append(inputs[0].shape)
        if isinstance(output, torch.Tensor):
            rec.output_shapes.append(output.shape)

    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook))
        yield records
    finally:
        for handle in handles:
            handle.remove()
