"""Curvature backends on ASDL (PyPI package ``asdfghjkl``, module ``asdl``).

ASDL computes Fisher matrices with hooks on ``nn.Linear``, ``nn.Conv2d``,
``nn.BatchNorm1d/2d``, ``nn.LayerNorm`` and ``nn.Embedding`` layers, which it
removes afterwards.  Its other side effects on the user's model (``fisher``
attributes on modules, ``_original_requires_grad`` on parameters, toggled
``requires_grad``) are undone here, and ``.grad`` is restored.

Conventions (checked against ASDL 0.1a4):

* exact / MC Fisher build the loss Hessian in, so the GGN of
  ``factor * lossfunc`` needs no rescaling; ASDL divides each of its ``M``
  Monte-Carlo losses by ``M``, which scales the outer products by ``1/M**2``
  and the sum over samples by ``1/M``: it is multiplied by ``M`` here;
* the empirical Fisher uses the unscaled summed loss: times ``factor**2``;
* KFAC ``A`` is the input covariance summed over the batch (and over the
  positions of a ``Linear`` on `(batch, *, in)` inputs; averaged over output
  positions for ``Conv2d``): divided here by the data set size ``N`` and by
  the ``Linear``'s number of positions, giving KFAC-expand like CurvlinopsGGN.

Full GGN / EF and Jacobians use the ``torch.func`` implementations of the base
classes; dict-like inputs and frozen parameters are supported.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from laplace.curvature._backend_utils import (
    ForwardRecord,
    check_data_size,
    import_backend,
    record_forwards,
    restore_attributes,
    seeded_global_rng,
)
from laplace.curvature.curvature import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    Input,
)
from laplace.curvature.curvlinops import _check_kfac_layers
from laplace.utils.enums import Likelihood
from laplace.utils.functional_utils import preserve_model_gradients
from laplace.utils.matrix import Kron

__all__ = ["AsdlEF", "AsdlGGN", "AsdlHessian", "AsdlInterface"]

_SUPPORTED = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.Embedding,
)
# Attributes ASDL sets on modules; registering its (non-full) backward hooks
# also flips torch's `_is_full_backward_hook`, which would forbid full backward
# hooks (BackPACK's, the user's) on those modules afterwards.
_ASDL_ATTRS = [
    "fisher",
    "hessian",
    "tmp_hessian",
    "fvp",
    "hvp",
    "tmp_hvp",
    "_is_full_backward_hook",
]


def _asdl() -> Any:
    return import_backend("asdl", "The ASDL backends", "pip install asdfghjkl")


class AsdlInterface(CurvatureInterface):
    """Shared ASDL plumbing: one Fisher computation per call, read per parameter."""

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        **kwargs,
    ) -> None:
        import_backend("asdl", type(self).__name__, "pip install asdfghjkl")
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **kwargs,
        )

    @property
    def loss_type(self) -> str:
        """ASDL's name of the loss: ``'mse'`` (regression) or ``'cross_entropy'``
        (classification, reward modelling)."""
        asdl = _asdl()
        if self.likelihood is Likelihood.REGRESSION:
            return asdl.LOSS_MSE
        return asdl.LOSS_CROSS_ENTROPY

    # -- hooks for subclasses ------------------------------------------------------
    def _fisher_type(self) -> tuple[str, int, float]:
        """ASDL fisher type, number of MC samples and the scale of its result."""
        raise NotImplementedError(
            "AsdlInterface is a base class; use AsdlGGN, AsdlEF or AsdlHessian."
        )

    # -- plumbing ------------------------------------------------------------------
    def _owners(self) -> dict[str, tuple[nn.Module, str]]:
        """``name -> (layer, 'weight' | 'bias')`` of each trainable parameter."""
        owners = {}
        for mod_name, mod in self._module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if not isinstance(mod, _SUPPORTED) or p_name not in ("weight", "bias"):
                    raise ValueError(
                        f"ASDL computes curvature only for weights and biases of "
                        f"{', '.join(c.__name__ for c in _SUPPORTED)}; parameter "
                        f"{name!r} belongs to a {type(mod).__name__}. Freeze it "
                        "(requires_grad=False) or use CurvlinopsGGN / CurvlinopsEF."
                    )
                owners[name] = (mod, p_name)
        return owners

    @contextmanager
    def _undo_side_effects(self) -> Iterator[None]:
        """Undo ASDL's side effects on the model and silence torch's warning
        about ASDL's (non-full) backward hooks."""
        module = self._module
        with ExitStack() as stack:
            stack.enter_context(restore_attributes(module.modules(), _ASDL_ATTRS))
            stack.enter_context(
                restore_attributes(module.parameters(), ["_original_requires_grad"])
            )
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*non-full backward hook")
            stack.enter_context(torch.enable_grad())
            yield

    def _fisher(
        self, x: Input, y: Tensor, shape: str
    ) -> tuple[Tensor, dict[str, Any], dict[int, ForwardRecord]]:
        """ASDL's Fisher of ``shape`` on the batch.

        Returns the loss `()`, per trainable parameter name the ASDL matrix of
        its layer, and forward records of the layers (keyed by layer id).
        """
        asdl = _asdl()
        owners = self._owners()
        fisher_type, n_samples, _ = self._fisher_type()
        config = asdl.FisherConfig(
            fisher_type=fisher_type,
            fisher_shapes=[shape],
            loss_type=self.loss_type,
            n_mc_samples=n_samples,
            data_size=1,
        )
        module, y = self._module, self._targets(y)
        maker = asdl.get_fisher_maker(module, config)
        dummy_out = maker.setup_model_call(module, x)
        maker.setup_loss_call(self.lossfunc, dummy_out, y)
        layers = {id(m): m for m, _ in owners.values()}
        device = next(iter(module.parameters())).device
        with self._undo_side_effects(), record_forwards(layers.values()) as records:
            with seeded_global_rng(getattr(self, "generator", None), device):
                maker.forward_and_backward()
            f = maker.model_output
            per_param = {}
            for name, (mod, _) in owners.items():
                mat = vars(mod).get("fisher")
                if mat is None:
                    raise ValueError(
                        f"ASDL computed no curvature for parameter {name!r}: its layer "
                        "was not called as a module in the forward pass. Use "
                        "CurvlinopsGGN / CurvlinopsEF."
                    )
                per_param[name] = mat
        return self._loss(f.detach(), y), per_param, records

    @preserve_model_gradients
    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and curvature diagonal `(P,)` from ASDL's diagonal Fisher."""
        asdl = _asdl()
        _, _, scale = self._fisher_type()
        loss, per_param, records = self._fisher(x, y, asdl.SHAPE_DIAG)
        owners = self._owners()
        _warn_if_diag_inexact(
            {n: (m, kind, records[id(m)]) for n, (m, kind) in owners.items()}
        )
        diags = [
            getattr(per_param[n].diag, kind).flatten()
            for n, (_, kind) in owners.items()
        ]
        return loss, self._restrict(scale * torch.cat(diags))

    @preserve_model_gradients
    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """Loss `()` and KFAC from ASDL.

        Blocks ``[G, A]`` per weight and ``[G]`` per bias in parameter order,
        ``A`` normalised by the data set size ``N`` and ``G`` summed.
        """
        asdl = _asdl()
        self._no_subnetwork_kron()
        N = check_data_size(N)
        # ASDL skips BatchNorm/LayerNorm with a warning: refuse instead.
        _check_kfac_layers(self._module)
        _, _, scale = self._fisher_type()
        loss, per_param, records = self._fisher(x, y, asdl.SHAPE_KRON)
        blocks = []
        for name, (mod, kind) in self._owners().items():
            record = records[id(mod)]
            if record.calls > 1:
                raise ValueError(
                    f"The layer of parameter {name!r} is called {record.calls} times "
                    "per forward pass; KFAC needs one call per layer. Use "
                    "hessian_structure 'diag' or 'full'."
                )
            factors = per_param[name].kron
            G = scale * factors.B
            if kind == "bias":
                blocks.append([G])
                continue
            A = factors.A / N
            if isinstance(mod, nn.Linear):
                A = A / record.positions(mod.in_features)
            blocks.append([G, A])
        return loss, Kron(blocks)


class AsdlGGN(AsdlInterface, GGNInterface):
    """GGN via ASDL's exact Fisher, or its Monte-Carlo Fisher with ``stochastic``.

    ``diag`` and ``kron`` use ASDL; ``full`` uses ``torch.func`` (see
    :class:`GGNInterface`).  Sampling follows ``generator`` when given.
    """

    def _fisher_type(self) -> tuple[str, int, float]:
        asdl = _asdl()
        if self.stochastic:
            return asdl.FISHER_MC, self.num_samples, float(self.num_samples)
        return asdl.FISHER_EXACT, 1, 1.0


class AsdlEF(AsdlInterface, EFInterface):
    """Empirical Fisher via ASDL (``diag``, ``kron``); ``full`` via ``torch.func``."""

    def _fisher_type(self) -> tuple[str, int, float]:
        return _asdl().FISHER_EMP, 1, self.factor**2


class AsdlHessian(AsdlInterface):
    """Exact Hessian of the loss via ASDL's ``HessianMaker`` (``full`` only)."""

    @preserve_model_gradients
    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and Hessian `(P, P)` of ``factor * lossfunc``."""
        asdl = _asdl()
        module, y = self._module, self._targets(y)
        maker = asdl.HessianMaker(
            module, asdl.HessianConfig(hessian_shapes=[asdl.SHAPE_FULL])
        )
        dummy_out = maker.setup_model_call(module, x)
        maker.setup_loss_call(self.lossfunc, dummy_out, y)
        with self._undo_side_effects():
            maker.forward_and_backward()
            H = vars(module)["hessian"].data
        idx = self.subnetwork_indices
        if idx is not None:
            H = self._restrict(self._restrict(H).T)
        return self.factor * maker.loss.detach(), self.factor * H

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            "AsdlHessian does not compute Kronecker-factored curvature; use AsdlGGN, "
            "AsdlEF or CurvlinopsGGN for hessian_structure='kron'."
        )

    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "AsdlHessian does not compute diagonal curvature; use AsdlGGN, AsdlEF or "
            "CurvlinopsGGN for hessian_structure='diag'."
        )


def _diag_positions(mod: nn.Module, kind: str, record: ForwardRecord) -> int:
    """Uses of a parameter per sample that ASDL's diagonal treats as separate
    samples (calls of its layer times positions per call)."""
    return record.calls * _positions_per_call(mod, kind, record)


def _positions_per_call(mod: nn.Module, kind: str, record: ForwardRecord) -> int:
    if isinstance(mod, nn.Linear):
        return record.positions(mod.in_features)
    if isinstance(mod, nn.LayerNorm):
        return record.positions(mod.weight.numel())
    if isinstance(mod, nn.Embedding):
        return record.positions(1)
    if isinstance(mod, nn.BatchNorm1d):
        return record.positions(mod.num_features)
    if isinstance(mod, nn.Conv2d) and kind == "weight":
        # ASDL's memory-saving branch sums squared per-position products.
        c_out, c_in, kh, kw = mod.weight.shape
        T = record.spatial_size()
        if T * (c_out + c_in * kh * kw) < c_out * c_in * kh * kw:
            return T
    return 1


def _warn_if_diag_inexact(
    layers: dict[str, tuple[nn.Module, str, ForwardRecord]],
) -> None:
    shared = {
        name: positions
        for name, (mod, kind, record) in layers.items()
        if (positions := _diag_positions(mod, kind, record)) > 1
    }
    if shared:
        listing = ", ".join(f"{n!r} ({p} uses)" for n, p in shared.items())
        warnings.warn(
            "ASDL's diagonal treats the uses of a parameter per sample (sequence "
            "positions, repeated calls of its layer, or convolution outputs in "
            "ASDL's memory-saving branch) as independent samples, an "
            "approximation of the exact diagonal, for "
            f"{listing}. Use CurvlinopsGGN / CurvlinopsEF for the exact diagonal.",
            stacklevel=4,
        )
