"""Curvature backends on curvlinops' linear operators (the library default).

Only curvlinops' public API is used: operators built on one batch
``[(x, y)]``, their ``@`` with torch tensors, and for KFAC
``compute_kronecker_factors()``, ``state_dict()`` and
``compute_parameter_mapping``.  curvlinops sees the unscaled losses
``MSELoss(reduction='sum')`` / ``CrossEntropyLoss(reduction='sum')``; results
are rescaled to the library's loss ``factor * lossfunc`` (GGN, Hessian and
sampled Fisher scale with ``factor``, gradient outer products with
``factor**2``).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    FisherType,
    GGNLinearOperator,
    HessianLinearOperator,
    KFACLinearOperator,
    KFACType,
)
from torch import Tensor, nn

from laplace.curvature._functional import batch_size
from laplace.curvature._used_params import (
    PaddedOperator,
    reached_parameters,
    used_positions,
)
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    Input,
)
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

__all__ = ["CurvlinopsEF", "CurvlinopsGGN", "CurvlinopsHessian", "CurvlinopsInterface"]

Operator = (
    GGNLinearOperator
    | FisherMCLinearOperator
    | EFLinearOperator
    | HessianLinearOperator
)
# Columns of the identity multiplied per operator call: bounds the memory of
# curvlinops' vmap over columns when forming dense matrices.
_MATMAT_CHUNK = 256
_KFAC_MODULES = (nn.Linear, nn.Conv2d)
_ABSTRACT = (
    "CurvlinopsInterface is a base class; use CurvlinopsGGN, CurvlinopsEF or "
    "CurvlinopsHessian."
)


class CurvlinopsInterface(CurvatureInterface):
    """Shared plumbing: operators on one batch, dense matrices, KFAC factors.

    Parameters
    ----------
    kfac_approx : {'expand', 'reduce'}, default='expand'
        KFAC flavour for layers with weight sharing (convolutions, sequences).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        kfac_approx: str = "expand",
        **kwargs,
    ) -> None:
        self.kfac_approx = _check_kfac_approx(kfac_approx)
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **kwargs,
        )

    # -- hooks for subclasses ------------------------------------------------------
    def _operator(
        self, x: Input, y: Tensor, params: list[nn.Parameter], options: dict[str, Any]
    ) -> tuple[Operator, float]:
        """The dense-curvature operator w.r.t. ``params`` on ``[(x, y)]`` and its
        scale; ``options`` are the per-call keywords merged over the constructor's."""
        raise NotImplementedError(_ABSTRACT)

    def _kfac_type(self, options: dict[str, Any]) -> tuple[dict, float]:
        """KFAC keyword arguments (fisher type, samples, seed) and G's scale."""
        raise NotImplementedError(_ABSTRACT)

    def _options(self, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call keywords of ``full`` (none here) and ``kron``
        (``kfac_approx``) over the constructor's; unknown ones: ``TypeError``."""
        defaults = {"kfac_approx": self.kfac_approx} if method == "kron" else {}
        options = self._call_options(method, kwargs, defaults)
        if "kfac_approx" in options:
            _check_kfac_approx(options["kfac_approx"])
        return options

    # -- shared plumbing -----------------------------------------------------------
    def _operator_kwargs(self, x: Input) -> dict:
        return {
            "check_deterministic": False,
            "num_data": batch_size(x, self.dict_key_x),
            "batch_size_fn": lambda X: batch_size(X, self.dict_key_x),
        }

    def _dense(self, op: Operator) -> Tensor:
        """``op`` as a dense matrix `(P, P)` (or `(K, K)` for a subnetwork)."""
        params = self.params
        P = sum(p.numel() for p in params)
        ref = params[0]
        cols = torch.arange(P, device=ref.device)
        if self.subnetwork_indices is not None:
            cols = self._restrict(cols)
        blocks = []
        for chunk in cols.split(_MATMAT_CHUNK):
            E = torch.zeros(P, len(chunk), dtype=ref.dtype, device=ref.device)
            E[chunk, torch.arange(len(chunk), device=ref.device)] = 1.0
            blocks.append(op @ E)
        H = torch.cat(blocks, dim=1)
        if self.subnetwork_indices is not None:
            H = H[cols]
        # Round-off makes the product slightly asymmetric; callers factorise it.
        return 0.5 * (H + H.T)

    def _used_parameters(self, x: Input, y: Tensor) -> tuple[Tensor, list[bool]]:
        """Loss `()` of the batch and which of ``self.params`` its forward pass
        uses (see :mod:`laplace.curvature._used_params`)."""
        with torch.enable_grad():
            f = self._module(x)
        return self._loss(f.detach(), y), reached_parameters(f, self.params)

    def curvature_operator(
        self, x: Input, y: Tensor, **kwargs: Any
    ) -> tuple[Tensor, Any, float]:
        """Loss `()` of the batch, its curvature as an operator (``op @ V`` for
        ``V`` of shape `(P, k)`) and the operator's scale. Parameters the forward
        pass does not use get zero rows and columns (prior only). Per-call
        keywords as for :meth:`full`."""
        options = self._options("full", kwargs)
        y = self._targets(y)
        loss, used = self._used_parameters(x, y)
        params = self.params
        if all(used):
            return (loss, *self._operator(x, y, params, options))
        op, scale = None, 1.0
        if any(used):
            used_params = [p for p, u in zip(params, used) if u]
            op, scale = self._operator(x, y, used_params, options)
        n = sum(p.numel() for p in params)
        return loss, PaddedOperator(op, used_positions(params, used), n), scale

    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and dense curvature `(P, P)` from the operator; per-call
        keywords (``mc_samples`` of a stochastic CurvlinopsGGN) override the
        constructor's."""
        loss, op, scale = self.curvature_operator(x, y, **kwargs)
        with torch.enable_grad():
            H = self._dense(op)
        return loss, scale * H

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """Loss `()` and KFAC; input factors are normalised by ``N``.

        Per weight ``[scale * G, A]`` with ``A`` the input covariance divided by
        the data set size ``N`` and ``G`` the gradient covariance summed over the
        batch; per bias ``[scale * G]``.  Summing the factors of all batches of a
        data set therefore gives the data set's KFAC.

        Per-call keywords override the constructor's: ``kfac_approx``
        ('expand' or 'reduce') and, for a stochastic CurvlinopsGGN,
        ``mc_samples``; others raise ``TypeError``.
        """
        options = self._options("kron", kwargs)
        self._no_subnetwork_kron()
        if isinstance(N, bool) or not isinstance(N, Integral) or N < 1:
            raise ValueError(f"N (data set size) must be a positive int, got {N!r}.")
        y = self._targets(y)
        module, params = self._module, self.params
        loss, used = self._used_parameters(x, y)
        # parameters the batch does not use keep zero factors (prior only)
        used_params = [p for p, u in zip(params, used) if u]
        _check_kfac_layers(module, {id(p) for p in used_params})
        if not used_params:
            return loss, Kron.init_from_model(params)
        kfac_kwargs, scale = self._kfac_type(options)
        op = KFACLinearOperator(
            module,
            self.lossfunc,
            used_params,
            [(x, y)],
            check_deterministic=False,
            kfac_approx=options["kfac_approx"],
            num_per_example_loss_terms=1,
            separate_weight_and_bias=True,
            num_data=int(N),
            batch_size_fn=lambda X: batch_size(X, self.dict_key_x),
            **kfac_kwargs,
        )
        with torch.enable_grad():
            op.compute_kronecker_factors()
        found = iter(_kron_from_state(op, used_params, module, scale).kfacs)
        blocks = [
            next(found) if u else Kron.init_from_model([p]).kfacs[0]
            for p, u in zip(params, used)
        ]
        return loss, Kron(blocks)


class CurvlinopsGGN(CurvlinopsInterface, GGNInterface):
    """GGN (or Monte-Carlo Fisher with ``stochastic``) via curvlinops.

    ``full``: ``GGNLinearOperator`` / ``FisherMCLinearOperator``; ``kron``:
    type-2 / MC KFAC; ``diag``: matrix-free ``torch.func`` (see
    :class:`GGNInterface`).  ``mc_samples`` is accepted as an alias of
    ``num_samples``.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        kfac_approx: str = "expand",
        **kwargs,
    ) -> None:
        num_samples = kwargs.pop("mc_samples", num_samples)
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            kfac_approx=kfac_approx,
            stochastic=stochastic,
            num_samples=num_samples,
            **kwargs,
        )

    def _seed(self) -> int:
        gen = self.generator
        device = gen.device if gen is not None else "cpu"
        return int(torch.randint(2**31 - 1, (1,), generator=gen, device=device))

    def _options(self, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        # mc_samples per call as well (checked by GGNInterface)
        options = self._sampling_options(method, kwargs)
        if "kfac_approx" in options:
            _check_kfac_approx(options["kfac_approx"])
        return options

    def _extra_options(self, method: str) -> dict[str, Any]:
        return {"kfac_approx": self.kfac_approx} if method == "kron" else {}

    def _operator(
        self,
        x: Input,
        y: Tensor,
        params: list[nn.Parameter],
        options: dict[str, Any],
    ) -> tuple[Operator, float]:
        args = (self._module, self.lossfunc, params, [(x, y)])
        if self.stochastic:
            op = FisherMCLinearOperator(
                *args,
                seed=self._seed(),
                mc_samples=options["mc_samples"],
                **self._operator_kwargs(x),
            )
        else:
            op = GGNLinearOperator(*args, **self._operator_kwargs(x))
        return op, self.factor

    def _kfac_type(self, options: dict[str, Any]) -> tuple[dict, float]:
        if self.stochastic:
            kwargs = {
                "fisher_type": FisherType.MC,
                "mc_samples": options["mc_samples"],
                "seed": self._seed(),
            }
        else:
            kwargs = {"fisher_type": FisherType.TYPE2}
        return kwargs, self.factor


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """Empirical Fisher via curvlinops (``EFLinearOperator``, empirical KFAC)."""

    def _operator(
        self,
        x: Input,
        y: Tensor,
        params: list[nn.Parameter],
        options: dict[str, Any],
    ) -> tuple[Operator, float]:
        op = EFLinearOperator(
            self._module,
            self.lossfunc,
            params,
            [(x, y)],
            **self._operator_kwargs(x),
        )
        return op, self.factor**2

    def _kfac_type(self, options: dict[str, Any]) -> tuple[dict, float]:
        return {"fisher_type": FisherType.EMPIRICAL}, self.factor**2


class CurvlinopsHessian(CurvlinopsInterface):
    """Exact Hessian of the loss via curvlinops' ``HessianLinearOperator``."""

    def _operator(
        self,
        x: Input,
        y: Tensor,
        params: list[nn.Parameter],
        options: dict[str, Any],
    ) -> tuple[Operator, float]:
        op = HessianLinearOperator(
            self._module,
            self.lossfunc,
            params,
            [(x, y)],
            **self._operator_kwargs(x),
        )
        return op, self.factor

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            "CurvlinopsHessian does not compute Kronecker-factored curvature; use "
            "CurvlinopsGGN or CurvlinopsEF for hessian_structure='kron'."
        )

    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "CurvlinopsHessian does not compute diagonal curvature; use CurvlinopsGGN "
            "or CurvlinopsEF for hessian_structure='diag'."
        )


def _check_kfac_approx(kfac_approx: Any) -> str:
    allowed = [t.value for t in KFACType]
    if kfac_approx not in allowed:
        raise ValueError(
            f"Invalid kfac_approx={kfac_approx!r}; allowed values are {allowed}."
        )
    return kfac_approx


def _check_kfac_layers(module: nn.Module, used: set[int] | None = None) -> None:
    """Refuse parameters KFAC cannot represent instead of being silently wrong;
    with ``used`` (parameter ids) only those are checked."""
    owners: dict[int, str] = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or (used is not None and id(p) not in used):
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in owners:
                raise ValueError(
                    f"Parameter {name!r} is shared with {owners[id(p)]!r}; KFAC needs "
                    "each parameter in one layer. Use hessian_structure 'diag' or "
                    "'full'."
                )
            owners[id(p)] = name
            if not isinstance(mod, _KFAC_MODULES):
                raise ValueError(
                    f"KFAC (hessian_structure='kron') supports parameters of nn.Linear "
                    f"and nn.Conv2d layers only, but {name!r} belongs to a "
                    f"{type(mod).__name__}. Use hessian_structure 'diag' or 'full', "
                    "freeze that layer (requires_grad=False), or use another backend."
                )


def _kron_from_state(
    op: KFACLinearOperator, params: list[nn.Parameter], module: nn.Module, scale: float
) -> Kron:
    """Kron blocks in parameter order from the operator's computed factors."""
    state = op.state_dict()
    A_all, G_all = state["input_covariances"], state["gradient_covariances"]
    mapping = KFACLinearOperator.compute_parameter_mapping(params, module)
    blocks: list[list[Tensor] | None] = [None] * len(params)
    for mod_name, positions in mapping.items():
        if mod_name not in G_all or ("weight" in positions and mod_name not in A_all):
            raise RuntimeError(
                f"KFAC factors of layer {mod_name!r} were not computed: its forward "
                "was not called on the batch (are its parameters used outside the "
                "module?). Use hessian_structure 'diag' or 'full'."
            )
        G = scale * G_all[mod_name]
        for p_name, pos in positions.items():
            blocks[pos] = [G, A_all[mod_name]] if p_name == "weight" else [G]
    return Kron(blocks)
