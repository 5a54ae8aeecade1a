"""Generic curvature backends on ``torch.func``: the GGN (exact or Monte-Carlo
Fisher) and the empirical Fisher, full and diagonal, for any model (see
:mod:`laplace.curvature.curvature` for the loss convention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from laplace.curvature._diag_ggn import diag_ggn
from laplace.curvature._loss_sqrt import exact_sqrt_fn, sampled_sqrt
from laplace.curvature.curvature import CurvatureInterface, Input
from laplace.utils.enums import Likelihood
from laplace.utils.matrix import Kron

__all__ = ["EFInterface", "GGNInterface"]


class GGNInterface(CurvatureInterface):
    """Generalised Gauss-Newton ``sum_n J_n^T Lambda_n J_n`` via ``torch.func``.

    Parameters
    ----------
    stochastic : bool, default=False
        Monte-Carlo Fisher: replace ``Lambda_n`` by outer products of loss
        gradients at ``num_samples`` labels drawn from the model.
    num_samples : int, default=1
        Labels drawn per data point when ``stochastic``.
    generator : torch.Generator, optional
        Source of randomness for the labels (global RNG when ``None``).
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
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"num_samples must be a positive int, got {num_samples!r}."
            )
        self.stochastic = stochastic
        self.num_samples = num_samples
        self.generator = generator
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **kwargs,
        )

    def _sampled_sqrt(self, f: Tensor, num_samples: int | None = None) -> Tensor:
        num_samples = self.num_samples if num_samples is None else num_samples
        return sampled_sqrt(f, self.likelihood, num_samples, self.generator)

    def _sampling_options(self, method: str, kwargs: dict[str, Any]) -> dict:
        """``mc_samples`` per call (Monte-Carlo labels when ``stochastic``)."""
        defaults = {"mc_samples": self.num_samples, **self._extra_options(method)}
        options = self._call_options(method, kwargs, defaults)
        if "mc_samples" in kwargs:
            mc = kwargs["mc_samples"]
            if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
                raise ValueError(f"mc_samples must be a positive int; got {mc!r}.")
            if not self.stochastic:
                raise ValueError(
                    f"mc_samples={mc} only applies to a stochastic (Monte-Carlo) "
                    f"{type(self).__name__}; construct it with stochastic=True."
                )
        return options

    def _extra_options(self, method: str) -> dict[str, Any]:
        """Further per-call keywords of ``method`` in subclasses, with their
        defaults."""
        return {}

    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and GGN `(P, P)` from per-sample Jacobians; ``mc_samples``
        may be given per call."""
        options = self._sampling_options("full", kwargs)
        Js, f = self.jacobians(x)
        if self.stochastic:
            L = self._sampled_sqrt(f, options["mc_samples"])
        elif self.likelihood is Likelihood.REGRESSION:
            L = None  # Lambda = I
        else:
            L = vmap(exact_sqrt_fn(self.likelihood))(f)
        M = Js if L is None else torch.einsum("boc,bop->bcp", L, Js)
        M = M.reshape(-1, M.shape[-1])
        return self._loss(f, y), M.T @ M

    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and GGN diagonal `(P,)` without materialising Jacobians;
        ``mc_samples`` may be given per call."""
        options = self._sampling_options("diag", kwargs)
        module = self._module
        with torch.no_grad():
            if self.stochastic:
                # Labels are drawn from the outputs, so they need a forward first.
                root = {"sqrt": self._sampled_sqrt(module(x), options["mc_samples"])}
            else:
                root = {"sqrt_fn": exact_sqrt_fn(self.likelihood)}
            dg, f = diag_ggn(
                module, self.params_dict, x, dict_key_x=self.dict_key_x, **root
            )
        return self._loss(f, y), self._restrict(dg)

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            f"{type(self).__name__} does not compute Kronecker-factored (KFAC) GGNs; "
            "use backend=CurvlinopsGGN."
        )


class EFInterface(CurvatureInterface):
    """Empirical Fisher ``sum_n g_n g_n^T`` from per-sample gradients."""

    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and empirical Fisher `(P, P)`."""
        self._call_options("full", kwargs, {})
        Gs, loss = self.gradients(x, y)
        return loss, Gs.T @ Gs

    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and empirical Fisher diagonal `(P,)`."""
        self._call_options("diag", kwargs, {})
        Gs, loss = self.gradients(x, y)
        return loss, Gs.square().sum(0)

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            f"{type(self).__name__} does not compute Kronecker-factored (KFAC) "
            "empirical Fishers; use backend=CurvlinopsEF."
        )
