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
from laplace import functional, parametric
from laplace import laplace as laplace
from laplace import lllaplace as lllaplace
from laplace import subnetlaplace as subnetlaplace
from laplace.approximation import BaseLaplace, NotFittedError
from laplace.factory import Laplace
from laplace.functional import *  # noqa: F403 (the function-space classes)
from laplace.marglik_training import marglik_training
from laplace.parametric import *  # noqa: F403 (the weight-space classes)
from laplace.utils import enums
from laplace.utils.enums import *  # noqa: F403 (the choices of the API)

__version__ = "0.1.0"

__all__ = [
    "Laplace",
    "marglik_training",
    "BaseLaplace",
    "NotFittedError",
    *parametric.__all__,
    *functional.__all__,
    *enums.__all__,
]
