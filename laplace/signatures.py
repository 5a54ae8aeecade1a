"""Constructor keywords, declared once.

Every keyword a Laplace class accepts is declared here with its default and
annotation (:data:`KEYWORDS`). A class states the order of its keywords
(laplace-torch 0.3's, see docs/api.md) as a :class:`Keywords` value built from
the shared orders below; :func:`constructor` turns that into the class's
``__init__``: it binds the arguments (positional or keyword) against that
signature and hands the complete dict of options to ``_setup``, so no class
forwards keyword lists to its base and none can be dropped on the way.
``inspect.signature(cls)`` shows the explicit signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = [
    "KEYWORDS",
    "Keywords",
    "constructor",
    "defaults",
    "BASE",
    "KRON",
    "LOW_RANK",
    "LAST_LAYER",
    "KRON_LAST_LAYER",
    "SUBNETWORK",
    "FUNCTIONAL",
    "SUBSET_OF_DATA",
    "SUBSET_OF_DATA_LAST_LAYER",
    "NYSTROM",
    "VARIATIONAL",
]

_REQUIRED = inspect.Parameter.empty

#: name -> (default, annotation) of every constructor keyword of the package
KEYWORDS: dict[str, tuple[Any, str]] = {
    "model": (_REQUIRED, "nn.Module"),
    "likelihood": (_REQUIRED, "Likelihood | str"),
    "sigma_noise": (1.0, "float | torch.Tensor"),
    "prior_precision": (1.0, "float | torch.Tensor"),
    "prior_mean": (0.0, "float | torch.Tensor"),
    "temperature": (1.0, "float"),
    "enable_backprop": (False, "bool"),
    "dict_key_x": ("input_ids", "str"),
    "dict_key_y": ("labels", "str"),
    "backend": (None, "type | None"),
    "backend_kwargs": (None, "dict[str, Any] | None"),
    "asdl_fisher_kwargs": (None, "dict[str, Any] | None"),
    # structures
    "damping": (False, "bool"),
    # last layer
    "feature_reduction": (None, "FeatureReduction | str | None"),
    "last_layer_name": (None, "str | None"),
    # subnetwork
    "subnetwork_indices": (_REQUIRED, "torch.LongTensor"),
    # function space
    "n_subset": (_REQUIRED, "int"),
    "independent_outputs": (False, "bool"),
    "seed": (0, "int"),
    "subsample_size": (_REQUIRED, "int"),
    "n_eigenvalues": (_REQUIRED, "int"),
    "nystrom_outputs": ("random", "str"),
    "inducing_locations": (_REQUIRED, "torch.Tensor | MutableMapping | str"),
    "num_inducing": (None, "int | None"),
    "inducing_classes": (None, "torch.Tensor | None"),
    "alpha": (1.0, "float"),
    "mc_softmax_samples": (0, "int"),
}


def defaults() -> dict[str, Any]:
    """The default of every optional keyword (what a piece reads when its class
    does not take that keyword)."""
    return {k: d for k, (d, _) in KEYWORDS.items() if d is not _REQUIRED}


class Keywords(tuple):
    """An ordered selection of :data:`KEYWORDS`: one class's signature."""

    def __new__(cls, *names: str) -> Keywords:
        unknown = [n for n in names if n not in KEYWORDS]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"Unknown or repeated keywords {unknown or names}.")
        return super().__new__(cls, names)

    def insert(
        self, name: str, *, before: str | None = None, after: str | None = None
    ) -> Keywords:
        """A copy with ``name`` inserted before or after an existing keyword."""
        at = self.index(before) if before is not None else self.index(after) + 1
        return Keywords(*self[:at], name, *self[at:])

    def without(self, *names: str) -> Keywords:
        return Keywords(*(n for n in self if n not in names))

    def signature(self, **overrides: Any) -> inspect.Signature:
        """The signature ``(self, *keywords)``; ``overrides`` replace defaults."""
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        for name in self:
            default, annotation = KEYWORDS[name]
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=overrides.get(name, default),
                    annotation=annotation,
                )
            )
        return inspect.Signature(params, return_annotation="None")


#: ``BaseLaplace``, ``ParametricLaplace``, ``FullLaplace``, ``DiagLaplace``
BASE = Keywords(
    "model",
    "likelihood",
    "sigma_noise",
    "prior_precision",
    "prior_mean",
    "temperature",
    "enable_backprop",
    "dict_key_x",
    "dict_key_y",
    "backend",
    "backend_kwargs",
    "asdl_fisher_kwargs",
)

#: ``KronLaplace``
KRON = BASE.insert("damping", before="backend_kwargs")

#: ``LowRankLaplace``
LOW_RANK = BASE.without("backend", "asdl_fisher_kwargs").insert(
    "backend", after="likelihood"
)

#: ``LLLaplace``, ``FullLLLaplace``, ``DiagLLLaplace``
LAST_LAYER = BASE.insert("feature_reduction", after="enable_backprop").insert(
    "last_layer_name", after="backend"
)

#: ``KronLLLaplace``
KRON_LAST_LAYER = LAST_LAYER.insert("damping", before="backend_kwargs")

#: ``SubnetLaplace``, ``FullSubnetLaplace``, ``DiagSubnetLaplace``
SUBNETWORK = Keywords(
    "model",
    "likelihood",
    "subnetwork_indices",
    *BASE[2:6],
    "backend",
    "backend_kwargs",
    "asdl_fisher_kwargs",
    *BASE[6:9],
)

#: ``BaseFunctionalLaplace``
FUNCTIONAL = BASE.without("asdl_fisher_kwargs")

#: ``FunctionalLaplace``
SUBSET_OF_DATA = (
    FUNCTIONAL.insert("n_subset", after="likelihood")
    .insert("independent_outputs", after="backend_kwargs")
    .insert("seed", after="independent_outputs")
)

#: ``FunctionalLLLaplace``
SUBSET_OF_DATA_LAST_LAYER = (
    SUBSET_OF_DATA.insert("feature_reduction", after="enable_backprop")
    .without("backend")
    .insert("last_layer_name", after="dict_key_y")
    .insert("backend", after="last_layer_name")
)

#: ``ELLA`` (its seed defaults to 1234)
NYSTROM = (
    FUNCTIONAL.insert("subsample_size", after="likelihood")
    .insert("n_eigenvalues", after="subsample_size")
    .insert("seed", after="backend_kwargs")
    .insert("nystrom_outputs", after="seed")
)

#: ``VaLLA``
VARIATIONAL = (
    FUNCTIONAL.insert("inducing_locations", after="likelihood")
    .insert("num_inducing", after="inducing_locations")
    .insert("inducing_classes", after="num_inducing")
    .insert("seed", after="backend_kwargs")
    .insert("alpha", after="seed")
    .insert("mc_softmax_samples", after="alpha")
)


def constructor(keywords: Keywords, **overrides: Any) -> Callable[..., None]:
    """An ``__init__`` with the signature of ``keywords`` (defaults replaced by
    ``overrides``) that calls ``self._setup(options)`` with every keyword bound:
    the given ones and the defaults of the others."""
    signature = keywords.signature(**overrides)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}(): {error}") from None
        bound.apply_defaults()
        options = {**defaults(), **bound.arguments}
        del options["self"]
        self._setup(options)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    return __init__
