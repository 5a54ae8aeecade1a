"""Parameter selectors: which parameters a posterior is over (all, last layer,
subnetwork) and how their Jacobians or features are obtained."""

from laplace.selectors.last_layer import LastLayer
from laplace.selectors.selector import AllWeights, ParameterSelector, SampledForward
from laplace.selectors.subnetwork import Subnetwork, check_subnetwork_indices

__all__ = [
    "ParameterSelector",
    "AllWeights",
    "LastLayer",
    "Subnetwork",
    "SampledForward",
    "check_subnetwork_indices",
]
