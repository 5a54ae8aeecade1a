"""Parameters as one flat vector, for parameters of any memory layout.

``torch.nn.utils.parameters_to_vector`` views each parameter as ``(-1,)``, which
fails for non-contiguous parameters (e.g. a weight that is a transposed view);
here each is reshaped (copied only when needed) in row-major order of its
shape.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["parameters_to_vector"]


def parameters_to_vector(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``params`` flattened row-major, ``(n_params,)``."""
    return torch.cat([p.reshape(-1) for p in params])
