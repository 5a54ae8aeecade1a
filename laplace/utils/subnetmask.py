"""Subnetwork masks: choose which parameters a subnetwork Laplace treats.

Every mask indexes the flattened vector of the model's trainable parameters
(``requires_grad=True``, in ``parameters()`` order, row-major), the vector that
:class:`~laplace.subnetlaplace.SubnetLaplace` takes ``subnetwork_indices`` into.
``mask.select(train_loader)`` returns those indices as a LongTensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from laplace.utils.data import split_batch, to_device
from laplace.utils.enums import Likelihood
from laplace.utils.errors import UnknownKeyError
from laplace.utils.feature_extractor import FeatureExtractor
from laplace.utils.parameter_vector import parameters_to_vector
from laplace.utils.swag import fit_diagonal_swag_var
from laplace.utils.utils import trainable_parameters

__all__ = [
    "SubnetMask",
    "ScoreBasedSubnetMask",
    "RandomSubnetMask",
    "LargestMagnitudeSubnetMask",
    "LargestVarianceDiagLaplaceSubnetMask",
    "LargestVarianceSWAGSubnetMask",
    "ParamNameSubnetMask",
    "ModuleNameSubnetMask",
    "LastLayerSubnetMask",
]


class SubnetMask:
    """Base class: a subnetwork of the trainable parameters of ``model``.

    Subclasses implement :meth:`get_subnet_mask`; :meth:`select` runs it once
    and records the indices.

    Attributes
    ----------
    indices : LongTensor
        The selected indices ``(K,)``; ``AttributeError`` before :meth:`select`.
    n_params_subnet : int
        The number of selected parameters ``K`` (for score-based masks the
        constructor value); ``AttributeError`` before :meth:`select` where it is
        not known in advance.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        self.model = model
        params = trainable_parameters(model)
        if not params:
            raise ValueError("The model has no parameter with requires_grad=True.")
        self._n_params = sum(p.numel() for p in params)
        self._device = params[0].device
        self._indices: torch.LongTensor | None = None

    @property
    def indices(self) -> torch.LongTensor:
        """The selected subnetwork indices `(K,)`; needs :meth:`select` first."""
        if getattr(self, "_indices", None) is None:
            # AttributeError, so that hasattr(mask, "indices") is False
            raise AttributeError(
                f"{type(self).__name__} has no indices yet; call select() first."
            )
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        """Number of parameters in the subnetwork."""
        fixed = getattr(self, "_n_params_subnet", None)
        if fixed is not None:
            return fixed
        if getattr(self, "_indices", None) is None:
            raise AttributeError(
                f"{type(self).__name__}.n_params_subnet is known after select()."
            )
        return len(self._indices)

    @n_params_subnet.setter
    def n_params_subnet(self, value: int) -> None:
        self._n_params_subnet = value

    def convert_subnet_mask_to_indices(
        self, subnet_mask: torch.Tensor
    ) -> torch.LongTensor:
        """Indices `(K,)` of the non-zero entries of a `(n_params,)` 0/1 mask."""
        if not isinstance(subnet_mask, torch.Tensor) or subnet_mask.shape != (
            self._n_params,
        ):
            shape = getattr(subnet_mask, "shape", type(subnet_mask).__name__)
            raise ValueError(
                f"subnet_mask must be a tensor of shape ({self._n_params},) (one entry "
                f"per trainable parameter); got {shape}."
            )
        if subnet_mask.dtype != torch.bool:
            if not ((subnet_mask == 0) | (subnet_mask == 1)).all():
                raise ValueError("subnet_mask must be boolean or hold only 0 and 1.")
            subnet_mask = subnet_mask.bool()
        indices = subnet_mask.nonzero().flatten()
        if indices.numel() == 0:
            raise ValueError("subnet_mask selects no parameter.")
        return indices

    def select(self, train_loader: Iterable | None = None) -> torch.LongTensor:
        """Select the subnetwork and return its indices `(K,)` (LongTensor); a
        mask selects once (``ValueError`` on a second call)."""
        if getattr(self, "_indices", None) is not None:
            raise ValueError(
                f"{type(self).__name__} has already selected a subnetwork; create a "
                "new mask to select again."
            )
        mask = self.get_subnet_mask(train_loader)
        self._indices = self.convert_subnet_mask_to_indices(mask)
        return self._indices

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """Boolean mask `(n_params,)` of the subnetwork."""
        raise NotImplementedError


class ScoreBasedSubnetMask(SubnetMask):
    """Select the ``n_params_subnet`` parameters with the highest scores."""

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        if (
            isinstance(n_params_subnet, bool)
            or not isinstance(n_params_subnet, int)
            or not 1 <= n_params_subnet <= self._n_params
        ):
            raise ValueError(
                f"n_params_subnet must be an int in [1, {self._n_params}] (the "
                f"number of trainable parameters); got {n_params_subnet!r}."
            )
        self._n_params_subnet = n_params_subnet

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """Scores `(n_params,)`; higher is more important."""
        raise NotImplementedError

    def compute_subnet_mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask `(n_params,)` of the ``n_params_subnet`` top scores."""
        if scores.shape != (self._n_params,):
            raise ValueError(
                f"Parameter scores must have shape ({self._n_params},); got "
                f"{tuple(scores.shape)}."
            )
        mask = torch.zeros(self._n_params, dtype=torch.bool, device=scores.device)
        mask[scores.topk(self._n_params_subnet).indices] = True
        return mask

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        return self.compute_subnet_mask_from_scores(
            self.compute_param_scores(train_loader)
        )


class RandomSubnetMask(ScoreBasedSubnetMask):
    """A uniformly random subnetwork (reproducible with ``generator``)."""

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, n_params_subnet)
        self.generator = generator

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else "cpu"
        scores = torch.rand(self._n_params, generator=self.generator, device=device)
        return scores.to(self._device)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The parameters of largest absolute value."""

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        return parameters_to_vector(trainable_parameters(self.model)).detach().abs()


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The parameters of largest marginal variance under a diagonal Laplace
    approximation over all weights (fitted on ``train_loader`` if needed)."""

    def __init__(
        self, model: nn.Module, n_params_subnet: int, diag_laplace_model: Any
    ) -> None:
        super().__init__(model, n_params_subnet)
        from laplace.parametric import DiagLaplace

        if not isinstance(diag_laplace_model, DiagLaplace):
            raise ValueError(
                "diag_laplace_model must be a DiagLaplace; got "
                f"{type(diag_laplace_model).__name__}."
            )
        if diag_laplace_model.n_params != self._n_params:
            raise ValueError(
                f"diag_laplace_model covers {diag_laplace_model.n_params} parameters, "
                f"the model has {self._n_params} trainable ones: use a DiagLaplace "
                "over all weights of the same model."
            )
        self.diag_laplace_model = diag_laplace_model

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        if not self.diag_laplace_model.is_fitted:
            if train_loader is None:
                raise ValueError(
                    "diag_laplace_model is not fitted; pass a train_loader to select()."
                )
            self.diag_laplace_model.fit(train_loader)
        return self.diag_laplace_model.posterior_variance


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The parameters of largest diagonal SWAG variance (see
    :func:`~laplace.utils.swag.fit_diagonal_swag_var`; the model is unchanged)."""

    def __init__(
        self,
        model: nn.Module,
        n_params_subnet: int,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        swag_n_snapshots: int = 40,
        swag_snapshot_freq: int = 1,
        swag_lr: float = 0.01,
    ) -> None:
        super().__init__(model, n_params_subnet)
        from laplace.likelihoods import likelihood_model  # laplace.utils loads first

        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        if likelihood_model(self.likelihood).pairs:
            raise ValueError(
                "LargestVarianceSWAGSubnetMask supports likelihood 'classification' "
                "or 'regression'; got 'reward_modeling'."
            )
        self.swag_n_snapshots = swag_n_snapshots
        self.swag_snapshot_freq = swag_snapshot_freq
        self.swag_lr = swag_lr

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        if train_loader is None:
            raise ValueError(
                "LargestVarianceSWAGSubnetMask.select needs a train_loader."
            )
        from laplace.likelihoods import likelihood_model

        lik = likelihood_model(self.likelihood)
        criterion = lik.loss_function(reduction="mean")
        return fit_diagonal_swag_var(
            self.model,
            train_loader,
            lambda f, y: criterion(f, lik.prepare_targets(y)),
            n_snapshots_total=self.swag_n_snapshots,
            snapshot_freq=self.swag_snapshot_freq,
            lr=self.swag_lr,
        )


def _names(value: Any, argname: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{argname} must be a non-empty list of str; got {value!r}.")
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{argname} must hold only str; got {value!r}.")
    return list(value)


class _ParamSetSubnetMask(SubnetMask):
    """Select whole parameter tensors."""

    def _mask_of(self, params: Iterable[nn.Parameter]) -> torch.Tensor:
        wanted = {id(p) for p in params}
        chunks = [
            torch.full((p.numel(),), id(p) in wanted, device=self._device)
            for p in trainable_parameters(self.model)
        ]
        return torch.cat(chunks)


class ParamNameSubnetMask(_ParamSetSubnetMask):
    """The parameter tensors called ``parameter_names`` (as in
    ``model.named_parameters()``)."""

    def __init__(self, model: nn.Module, parameter_names: Sequence[str]) -> None:
        super().__init__(model)
        self._parameter_names = _names(parameter_names, "parameter_names")
        self._named()  # unknown names fail here, not at select()

    def _named(self) -> dict[str, nn.Parameter]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        for name in self._parameter_names:
            if name not in named:
                raise UnknownKeyError(
                    f"parameter_names holds {name!r}, which is not a parameter of the "
                    f"model; available: {list(named)[:20]}."
                )
        return named

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        named = self._named()
        for name in self._parameter_names:
            if not named[name].requires_grad:
                raise ValueError(
                    f"Parameter {name!r} has requires_grad=False and cannot be part of "
                    "the subnetwork."
                )
        return self._mask_of(named[n] for n in self._parameter_names)


class ModuleNameSubnetMask(_ParamSetSubnetMask):
    """All trainable parameters of the modules called ``module_names`` (as in
    ``model.named_modules()``), including their submodules."""

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        super().__init__(model)
        self._module_names = _names(module_names, "module_names")
        self._modules()  # unknown names fail here, not at select()

    def _modules(self) -> dict[str, nn.Module]:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for name in self._module_names:
            if name not in modules:
                raise UnknownKeyError(
                    f"module_names holds {name!r}, which is not a module of the "
                    f"model; available: {[n for n in modules if n][:20]}."
                )
        return modules

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        modules = self._modules()
        selected = []
        for name in self._module_names:
            params = [p for p in modules[name].parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"Module {name!r} has no trainable parameters.")
            selected += params
        return self._mask_of(selected)


class LastLayerSubnetMask(ModuleNameSubnetMask):
    """The parameters of the last layer: ``last_layer_name`` or, when ``None``,
    the last ``nn.Linear`` found on the first batch of ``train_loader``."""

    def __init__(self, model: nn.Module, last_layer_name: str | None = None) -> None:
        if last_layer_name is not None and not isinstance(last_layer_name, str):
            raise ValueError(
                f"last_layer_name must be a str or None; got {last_layer_name!r}."
            )
        SubnetMask.__init__(self, model)
        self._last_layer_name = last_layer_name
        self._module_names = [] if last_layer_name is None else [last_layer_name]
        self._modules()  # an unknown last_layer_name fails here

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        if self._last_layer_name is None:
            self._last_layer_name = self._find_last_layer(train_loader)
            self._module_names = [self._last_layer_name]
        return super().get_subnet_mask(train_loader)

    def _find_last_layer(self, train_loader: Iterable | None) -> str:
        from laplace.approximation import eval_mode

        if train_loader is None:
            raise ValueError(
                "LastLayerSubnetMask without last_layer_name needs a train_loader "
                "to find the last layer."
            )
        batch = next(iter(train_loader), None)
        if batch is None:
            raise ValueError("train_loader yielded no batches.")
        X, _ = split_batch(batch)
        extractor = FeatureExtractor(self.model)
        # eval mode: the probing forward pass must not update e.g. BatchNorm stats
        with eval_mode(self.model), torch.no_grad():
            extractor.find_last_layer(to_device(X, self._device))
        return extractor.last_layer_name
