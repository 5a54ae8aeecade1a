"""Utilities of the laplace-torch ``laplace.utils`` namespace."""

from laplace.utils import enums, functional_utils, linalg, subnetmask
from laplace.utils.enums import *  # noqa: F403 (the choices of the API)
from laplace.utils.errors import UnknownKeyError
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.functional_utils import *  # noqa: F403 (laplace-torch's helpers)
from laplace.utils.linalg import *  # noqa: F403 (dense linear algebra)
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.subnetmask import *  # noqa: F403 (the subnetwork masks)
from laplace.utils.swag import fit_diagonal_swag_var
from laplace.utils.utils import (
    _is_batchnorm,
    _is_valid_scalar,
    expand_prior_precision,
    fix_prior_prec_structure,
    get_nll,
    normal_samples,
    parameters_per_layer,
)
from laplace.utils.validation_score import validate

# The running metrics subclass torchmetrics classes, and importing torchmetrics
# takes seconds (it imports its text metrics' transformers); load it on first use.
_LAZY_METRICS = ("RunningNLLMetric", "RunningMSEMetric")

__all__ = [
    *functional_utils.__all__,
    *subnetmask.__all__,
    *linalg.__all__,
    *enums.__all__,
    "UnknownKeyError",
    "fit_diagonal_swag_var",
    "FeatureExtractor",
    "Kron",
    "KronDecomposed",
    *_LAZY_METRICS,
    "validate",
    "get_nll",
    "parameters_per_layer",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "normal_samples",
    "_is_batchnorm",
    "_is_valid_scalar",
]


def __getattr__(name: str):
    if name in _LAZY_METRICS:
        from laplace.utils import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
