"""laplace: Laplace approximations for deep learning.

Drop-in compatible with the public API of laplace-torch 0.3::

    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="last_layer",
                 hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x_test, pred_type="glm", link_approx="probit")
"""

# laplace-torch's module paths, also as attributes of the package
from laplace import baselaplace as baselaplace
from laplace import laplace as laplace
from laplace import lllaplace as lllaplace
from laplace import subnetlaplace as subnetlaplace
from laplace.approximation import BaseLaplace, NotFittedError
from laplace.factory import Laplace
from laplace.functional import (
    ELLA,
    BaseFunctionalLaplace,
    FunctionalLaplace,
    FunctionalLLLaplace,
    VaLLA,
)
from laplace.marglik_training import marglik_training
from laplace.parametric import (
    DiagLaplace,
    DiagLLLaplace,
    DiagSubnetLaplace,
    FullLaplace,
    FullLLLaplace,
    FullSubnetLaplace,
    KronLaplace,
    KronLLLaplace,
    LLLaplace,
    LowRankLaplace,
    ParametricLaplace,
    SubnetLaplace,
)
from laplace.utils.enums import (
    FunctionalApproximation,
    HessianStructure,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    TuningMethod,
)

__version__ = "0.1.0"

__all__ = [
    "Laplace",
    "marglik_training",
    "BaseLaplace",
    "ParametricLaplace",
    "FullLaplace",
    "KronLaplace",
    "DiagLaplace",
    "LowRankLaplace",
    "BaseFunctionalLaplace",
    "FunctionalLaplace",
    "FunctionalLLLaplace",
    "ELLA",
    "VaLLA",
    "LLLaplace",
    "FullLLLaplace",
    "KronLLLaplace",
    "DiagLLLaplace",
    "SubnetLaplace",
    "FullSubnetLaplace",
    "DiagSubnetLaplace",
    "NotFittedError",
    "SubsetOfWeights",
    "HessianStructure",
    "FunctionalApproximation",
    "Likelihood",
    "PredType",
    "LinkApprox",
    "TuningMethod",
    "PriorStructure",
]
