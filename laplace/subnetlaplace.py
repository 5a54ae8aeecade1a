"""laplace-torch import path ``laplace.subnetlaplace`` (re-exports)."""

from laplace.parametric import DiagSubnetLaplace, FullSubnetLaplace, SubnetLaplace
from laplace.selectors import check_subnetwork_indices

__all__ = [
    "SubnetLaplace",
    "FullSubnetLaplace",
    "DiagSubnetLaplace",
    "check_subnetwork_indices",
]
