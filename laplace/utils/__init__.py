"""Utilities of the laplace-torch ``laplace.utils`` namespace."""

from laplace.utils.data import batch_size, split_batch, to_device
from laplace.utils.enums import (
    FeatureReduction,
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)
from laplace.utils.errors import UnknownKeyError
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.functional_utils import (
    classification_targets,
    concatenate_rows,
    draw_gaussian,
    preserve_model_gradients,
    regression_targets,
    same_configuration,
    select_rows,
    subset_loader,
    training_indices,
)
from laplace.utils.linalg import (
    block_diag,
    diagonal_add_scalar,
    invsqrt_precision,
    kron,
    symeig,
)
from laplace.utils.matrix import Kron, KronDecomposed
from laplace.utils.subnetmask import (
    LargestMagnitudeSubnetMask,
    LargestVarianceDiagLaplaceSubnetMask,
    LargestVarianceSWAGSubnetMask,
    LastLayerSubnetMask,
    ModuleNameSubnetMask,
    ParamNameSubnetMask,
    RandomSubnetMask,
    ScoreBasedSubnetMask,
    SubnetMask,
)
from laplace.utils.subsets import SoDSampler
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
from laplace.utils.validation import validate

__all__ = [
    "UnknownKeyError",
    "preserve_model_gradients",
    "same_configuration",
    "draw_gaussian",
    "regression_targets",
    "classification_targets",
    "training_indices",
    "subset_loader",
    "concatenate_rows",
    "select_rows",
    "SoDSampler",
    "SubnetMask",
    "ScoreBasedSubnetMask",
    "RandomSubnetMask",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "ParamNameSubnetMask",
    "ModuleNameSubnetMask",
    "LastLayerSubnetMask",
    "fit_diagonal_swag_var",
    "FeatureExtractor",
    "FeatureReduction",
    "Kron",
    "KronDecomposed",
    "RunningNLLMetric",
    "RunningMSEMetric",
    "validate",
    "get_nll",
    "parameters_per_layer",
    "expand_prior_precision",
    "fix_prior_prec_structure",
    "normal_samples",
    "invsqrt_precision",
    "kron",
    "diagonal_add_scalar",
    "symeig",
    "block_diag",
    "split_batch",
    "batch_size",
    "to_device",
    "_is_batchnorm",
    "_is_valid_scalar",
    "SubsetOfWeights",
    "HessianStructure",
    "FunctionalApproximation",
    "Likelihood",
    "PredType",
    "LinkApprox",
    "TuningMethod",
    "PriorStructure",
]

# The running metrics subclass torchmetrics classes, and importing torchmetrics
# takes seconds (it imports its text metrics' transformers); load it on first use.
_LAZY_METRICS = ("RunningNLLMetric", "RunningMSEMetric")


def __getattr__(name: str):
    if name in _LAZY_METRICS:
        from laplace.utils import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
