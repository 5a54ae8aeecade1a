"""laplace-torch 0.3's ``laplace.utils.functional_utils``: helpers for batches,
targets, data subsets, Gaussian draws and keeping the user's model untouched,
with the same names, signatures and meaning; each lives with its concept."""

from laplace.utils.autograd_mode import preserve_model_gradients
from laplace.utils.configuration import same_configuration
from laplace.utils.data import (
    batch_size,
    concatenate_rows,
    select_rows,
    split_batch,
    to_device,
)
from laplace.utils.gaussian import draw_gaussian
from laplace.utils.subsets import SoDSampler, subset_loader, training_indices
from laplace.utils.targets import classification_targets, regression_targets

__all__ = [
    "SoDSampler",
    "batch_size",
    "classification_targets",
    "concatenate_rows",
    "draw_gaussian",
    "preserve_model_gradients",
    "regression_targets",
    "same_configuration",
    "select_rows",
    "split_batch",
    "subset_loader",
    "to_device",
    "training_indices",
]
