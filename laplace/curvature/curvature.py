"""The curvature interface: the loss convention, parameters, Jacobians and
gradients (the generic ``torch.func`` GGN and EF backends are in
:mod:`laplace.curvature.generic`).

Every backend returns curvature of the *summed* loss of a batch w.r.t. the
trainable parameters (``requires_grad=True``, in ``parameters()`` order,
flattened row-major):

* regression: ``0.5 * sum_n ||f_n - y_n||^2`` (``MSELoss(reduction='sum')``
  times ``factor = 0.5``), output Hessian ``Lambda_n = I``;
* classification (and reward modelling): ``CrossEntropyLoss(reduction='sum')``,
  ``factor = 1``, ``Lambda_n = diag(p_n) - p_n p_n^T``.

GGN = ``sum_n J_n^T Lambda_n J_n``, EF = ``sum_n g_n g_n^T`` with per-sample
gradients ``g_n`` of the scaled loss.  With ``last_layer=True`` the model is a
:class:`~laplace.utils.feature_extractor.FeatureExtractor`, ``x`` holds its
features and only ``model.last_layer`` is differentiated.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from laplace.curvature._functional import (
    batch_size,
    per_sample_gradients,
    per_sample_jacobians,
    selected_jacobians,
)
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

# GGNInterface and EFInterface live in laplace.curvature.generic; this module
# keeps laplace-torch's import path for them (resolved on first access, so that
# the two modules can import each other in either order).
_GENERIC = ("GGNInterface", "EFInterface")

__all__ = ["CurvatureInterface", *_GENERIC]


def __getattr__(name: str) -> Any:
    if name in _GENERIC:
        from laplace.curvature import generic

        return getattr(generic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Input = Tensor | MutableMapping


class CurvatureInterface:
    """Base class: loss convention, parameters, Jacobians and gradients.

    Parameters
    ----------
    model : nn.Module
        The network; a ``FeatureExtractor`` when ``last_layer=True``.
    likelihood : Likelihood or str
        ``'regression'``, ``'classification'`` or ``'reward_modeling'``.
    last_layer : bool, default=False
        Differentiate only ``model.last_layer``; inputs are its features.
    subnetwork_indices : LongTensor, optional
        Indices `(K,)` into the flattened parameter vector; curvature, Jacobians
        and gradients are restricted to them.
    dict_key_x, dict_key_y : str
        Keys of inputs and targets in dict-like batches.
    """

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
        if kwargs:
            warnings.warn(
                f"{type(self).__name__} ignores unknown arguments {sorted(kwargs)}.",
                stacklevel=2,
            )
        self.model = model
        self.likelihood = Likelihood.parse(likelihood, "likelihood")
        self.last_layer = last_layer
        self.subnetwork_indices = _check_indices(subnetwork_indices)
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        if self.likelihood is Likelihood.REGRESSION:
            self.lossfunc: nn.Module = nn.MSELoss(reduction="sum")
            self.factor = 0.5
        else:
            self.lossfunc = nn.CrossEntropyLoss(reduction="sum")
            self.factor = 1.0

    @property
    def _module(self) -> nn.Module:
        """The module whose parameters the curvature is taken of."""
        if not self.last_layer:
            return self.model
        layer = getattr(self.model, "last_layer", None)
        if layer is None:
            raise ValueError(
                "last_layer=True needs a model with a `last_layer` module (a "
                "FeatureExtractor whose last layer is set); got "
                f"{type(self.model).__name__} with last_layer={layer}."
            )
        return layer

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters of the curvature module, in order."""
        return [p for p in self._module.parameters() if p.requires_grad]

    @property
    def params_dict(self) -> dict[str, nn.Parameter]:
        """``name -> parameter`` for the trainable parameters."""
        return {n: p for n, p in self._module.named_parameters() if p.requires_grad}

    @property
    def buffers_dict(self) -> dict[str, Tensor]:
        return dict(self._module.named_buffers())

    def jacobians(
        self, x: Input, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the outputs w.r.t. the parameters.

        Returns
        -------
        Js : Tensor
            `(batch, n_outputs, P)` (``P = K`` for a subnetwork).
        f : Tensor
            Outputs `(batch, n_outputs)`.

        With ``enable_backprop`` both stay differentiable w.r.t. ``x``.
        """
        with torch.set_grad_enabled(enable_backprop):
            Js, f = per_sample_jacobians(
                self._module, self.params_dict, x, self.dict_key_x
            )
        return self._restrict(Js), f

    def last_layer_jacobians(
        self, x: Input, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians w.r.t. the last-layer parameters from raw inputs ``x``.

        For an ``nn.Linear`` last layer, ``Js[b, o] = kron(e_o, phi_b)`` for the
        weight followed by ``e_o`` for the bias (closed form, no autograd).

        Returns
        -------
        Js : Tensor
            `(batch, n_outputs, P_last_layer)`.
        f : Tensor
            Outputs `(batch, n_outputs)`.
        """
        with torch.set_grad_enabled(enable_backprop):
            out, phi = self.model.forward_with_features(x)
            layer = self.model.last_layer
            f = out if out.ndim == 2 else layer(phi)
            if isinstance(layer, nn.Linear):
                Js = _linear_jacobians(layer, phi, f.shape[1])
            else:
                params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
                Js, _ = per_sample_jacobians(layer, params, phi)
        return Js, f

    def functorch_jacobians(
        self, x: Input, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians from ``torch.func`` (whatever the backend), in
        laplace-torch's layout.

        Returns
        -------
        Js : Tensor
            `(batch, P, n_outputs)` (``P = K`` for a subnetwork).
        f : Tensor
            Outputs `(batch, n_outputs)`.
        """
        Js, f = CurvatureInterface.jacobians(self, x, enable_backprop)
        return Js.transpose(1, 2), f

    def selected_output_jacobians(
        self, x: Input, outputs: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of chosen outputs only, one backward pass per chosen output.

        Parameters
        ----------
        x : Tensor or dict-like
        outputs : LongTensor
            Output indices per sample, `(batch,)` (one each) or
            `(batch, selected)`.
        enable_backprop : bool, default=False

        Returns
        -------
        Js : Tensor
            `(batch, selected, P)`; ``Js[b, s]`` is the gradient of
            ``f[b, outputs[b, s]]``.
        f : Tensor
            All outputs `(batch, n_outputs)`.
        """
        n = batch_size(x, self.dict_key_x)
        if not isinstance(outputs, Tensor) or outputs.is_floating_point():
            raise ValueError(
                "outputs must be an integer tensor of output indices of shape "
                f"(batch,) or (batch, selected); got {outputs!r}."
            )
        index = outputs.reshape(-1, 1) if outputs.ndim == 1 else outputs
        if index.ndim != 2 or len(index) != n:
            raise ValueError(
                f"outputs must have shape ({n},) or ({n}, selected); got "
                f"{tuple(outputs.shape)}."
            )
        index = index.long().to(self.params[0].device)
        try:
            with torch.set_grad_enabled(enable_backprop):
                Js, f = selected_jacobians(
                    self._module, self.params_dict, x, index, self.dict_key_x
                )
        except (IndexError, RuntimeError) as err:
            if "index" not in str(err).lower():
                raise
            raise ValueError(
                "outputs holds an index outside the model's outputs; got values in "
                f"[{int(index.min())}, {int(index.max())}]."
            ) from err
        return self._restrict(Js), f

    def gradients(self, x: Input, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of ``factor * loss_n``.

        Returns
        -------
        Gs : Tensor
            `(batch, P)`.
        loss : Tensor
            Summed loss, `()`.
        """
        y = self._targets(y)

        def loss_n(f_n: Tensor, y_n: Tensor) -> Tensor:
            return self.factor * self.lossfunc(f_n.unsqueeze(0), y_n.unsqueeze(0))

        with torch.no_grad():
            Gs, losses = per_sample_gradients(
                self._module, self.params_dict, x, y, loss_n, self.dict_key_x
            )
        return self._restrict(Gs), losses.sum()

    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and dense curvature `(P, P)` of the batch."""
        raise NotImplementedError(
            f"{type(self).__name__} does not compute full curvature; use a GGN, EF "
            "or Hessian backend such as CurvlinopsGGN."
        )

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """Loss `()` and Kronecker-factored curvature; ``N`` = data set size."""
        raise NotImplementedError(
            f"{type(self).__name__} does not compute Kronecker-factored curvature; "
            "use CurvlinopsGGN or CurvlinopsEF."
        )

    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and curvature diagonal `(P,)` of the batch."""
        raise NotImplementedError(
            f"{type(self).__name__} does not compute diagonal curvature; use a GGN "
            "or EF backend such as CurvlinopsGGN."
        )

    # -- helpers ---------------------------------------------------------------
    def _call_options(
        self, method: str, kwargs: dict[str, Any], defaults: dict[str, Any]
    ) -> dict[str, Any]:
        """Per-call keywords of ``method`` over the constructor's ``defaults``;
        an unknown keyword is a ``TypeError``, never dropped silently."""
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            accepted = sorted(defaults) or "none"
            raise TypeError(
                f"{type(self).__name__}.{method}() got unexpected keyword "
                f"argument(s) {unknown}; it accepts {accepted}."
            )
        return {**defaults, **kwargs}

    def _targets(self, y: Tensor) -> Tensor:
        # Regression targets `(batch,)` mean one output; MSELoss would broadcast
        # them against `(batch, 1)` outputs to `(batch, batch)`.
        if self.likelihood is Likelihood.REGRESSION and y.ndim == 1:
            return y.unsqueeze(-1)
        return y

    def _loss(self, f: Tensor, y: Tensor) -> Tensor:
        return (self.factor * self.lossfunc(f, self._targets(y))).detach()

    def _restrict(self, t: Tensor) -> Tensor:
        """Select the subnetwork columns (last dim) of ``t``."""
        idx = self.subnetwork_indices
        if idx is None:
            return t
        n = t.shape[-1]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(
                f"subnetwork_indices must lie in [0, {n}) for a model with {n} "
                f"trainable parameters; got range [{int(idx.min())}, {int(idx.max())}]."
            )
        return t.index_select(-1, idx.to(t.device))

    def _no_subnetwork_kron(self) -> None:
        if self.subnetwork_indices is not None:
            raise ValueError(
                "Kronecker-factored curvature is not defined for a subnetwork "
                "(subnetwork_indices is set); use hessian_structure 'full' or 'diag'."
            )


def _check_indices(indices: Tensor | None) -> Tensor | None:
    if indices is None:
        return None
    if (
        not isinstance(indices, Tensor)
        or indices.ndim != 1
        or indices.dtype not in (torch.int64, torch.int32)
        or indices.numel() == 0
    ):
        raise ValueError(
            "subnetwork_indices must be a non-empty 1-d LongTensor of indices into "
            f"the flattened parameters; got {indices!r}."
        )
    return indices.long()


def _linear_jacobians(layer: nn.Linear, phi: Tensor, n_outputs: int) -> Tensor:
    """Closed-form Jacobians `(batch, n_outputs, P)` of ``layer(phi)``."""
    eye = torch.eye(n_outputs, dtype=phi.dtype, device=phi.device)
    batch = phi.shape[0]
    blocks = []
    if layer.weight.requires_grad:
        # d f_o / d W[q, d] = delta_oq phi_d, flattened row-major over (q, d).
        blocks.append(
            torch.einsum("oq,bd->boqd", eye, phi).reshape(batch, n_outputs, -1)
        )
    if layer.bias is not None and layer.bias.requires_grad:
        blocks.append(eye.expand(batch, n_outputs, n_outputs))
    if not blocks:
        raise ValueError("The last layer has no trainable parameters (requires_grad).")
    return torch.cat(blocks, dim=2)
