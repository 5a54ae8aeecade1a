"""Curvature backends on BackPACK (``backpack-for-pytorch``).

BackPACK computes per-parameter quantities in one backward pass through hooks
that :func:`backpack.extend` installs on every layer.  To leave the user's
model untouched, each call extends a *clone* of the module that shares the
parameter and buffer tensors (so BackPACK writes its results onto the user's
parameters, from which they are read and then removed) and is discarded
afterwards; ``.grad`` and ``requires_grad`` of the parameters are restored.

BackPACK sees the unscaled losses ``MSELoss(reduction='sum')`` /
``CrossEntropyLoss(reduction='sum')``; its results are rescaled to the loss
``factor * lossfunc`` (GGN quantities by ``factor``, gradient outer products
by ``factor**2``).

Limitations (BackPACK's): tensor inputs only (no dict-like batches) and
models built from BackPACK-supported ``torch.nn`` layers with no functional or
in-place operations between them (``nn.Sequential``-like).  Frozen parameters
(``requires_grad=False``) are supported.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

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

__all__ = ["BackPackEF", "BackPackGGN", "BackPackInterface"]

_ALTERNATIVE = "use CurvlinopsGGN / CurvlinopsEF (or AsdlGGN / AsdlEF) instead"


class BackPackInterface(CurvatureInterface):
    """Shared BackPACK plumbing: extended clone, extensions, Jacobians, gradients.

    ``jacobians`` uses BackPACK's ``BatchGrad`` (one backward pass per output);
    with ``enable_backprop=True`` it falls back to ``torch.func`` because
    BackPACK's per-sample gradients are not differentiable w.r.t. the input.
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
        import_backend(
            "backpack", type(self).__name__, "pip install backpack-for-pytorch"
        )
        super().__init__(
            model,
            likelihood,
            last_layer,
            subnetwork_indices,
            dict_key_x,
            dict_key_y,
            **kwargs,
        )

    # -- plumbing --------------------------------------------------------------
    def _check_input(self, x: Input) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{type(self).__name__} needs tensor inputs, got "
                f"{type(x).__name__}: BackPACK cannot propagate through dict-like "
                f"batches; {_ALTERNATIVE}."
            )

    @contextmanager
    def _session(self, x: Input, fields: list[str]) -> Iterator[nn.Module]:
        """An extended clone of the module; BackPACK's ``fields`` are removed
        from the parameters on exit."""
        from backpack import extend
        from backpack.context import CTX

        self._check_input(x)
        module = self._module
        shared = {
            id(t): t for t in itertools.chain(module.parameters(), module.buffers())
        }
        clone = copy.deepcopy(module, memo=shared)
        n_handles = len(CTX.hook_handles)
        with ExitStack() as stack:
            stack.enter_context(restore_attributes(module.parameters(), fields))
            stack.enter_context(warnings.catch_warnings())
            # The first layer's input needs no gradient; torch warns about that.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stack.enter_context(torch.enable_grad())
            try:
                yield extend(clone)
            finally:
                # The clone dies with this call; drop its hook handles from
                # BackPACK's global registry, which would otherwise keep growing.
                del CTX.hook_handles[n_handles:]

    def _backward(self, root: Tensor, *extensions, retain_graph: bool = False) -> None:
        from backpack import backpack

        try:
            with backpack(*extensions, retain_graph=retain_graph):
                root.backward(retain_graph=retain_graph)
        except (NotImplementedError, AssertionError) as err:
            raise ValueError(
                f"BackPACK cannot handle this model ({type(err).__name__}: {err}). "
                "BackPACK needs models built from its supported torch.nn layers, "
                f"with no functional or in-place operations between them; {_ALTERNATIVE}."
            ) from err

    def _read(self, fields: list[str]) -> dict[str, list]:
        """BackPACK's results on the trainable parameters, in parameter order."""
        values: dict[str, list] = {f: [] for f in fields}
        for name, p in self.params_dict.items():
            for f in fields:
                value = vars(p).get(f)
                if value is None:
                    raise ValueError(
                        f"BackPACK computed no {f!r} for parameter {name!r}: its layer "
                        "was not called as a module in the forward pass, or is not "
                        f"supported by BackPACK; {_ALTERNATIVE}."
                    )
                values[f].append(value)
        return values

    def _forward(self, clone: nn.Module, x: Tensor) -> tuple[Tensor, dict]:
        """Forward pass of the clone, refusing layers called more than once
        (BackPACK keeps one input per layer and would silently mix calls up)."""
        leaves = [m for m in clone.modules() if next(m.children(), None) is None]
        with record_forwards(leaves) as records:
            f = clone(x)
        names = {id(m): n for n, m in clone.named_modules()}
        for key, record in records.items():
            if record.calls > 1:
                raise ValueError(
                    f"Layer {names.get(key, '?')!r} is called {record.calls} times "
                    "per forward pass; BackPACK needs each layer to be called once. "
                    f"Reuse no module instances, or {_ALTERNATIVE}."
                )
        return f, records

    def _run(
        self, x: Input, y: Tensor, *extensions
    ) -> tuple[Tensor, dict[str, list], dict[int, tuple[nn.Module, ForwardRecord]]]:
        """Forward, summed loss and one backward pass with ``extensions``.

        Returns the outputs (detached), the extensions' results per field and,
        per trainable parameter id, its layer in the clone with the record of
        that layer's forward call.
        """
        fields = [ext.savefield for ext in extensions]
        with self._session(x, fields) as clone:
            f, records = self._forward(clone, x)
            loss = _extend_loss(self.lossfunc)(f, y)
            with seeded_global_rng(getattr(self, "generator", None), f.device):
                self._backward(loss, *extensions)
            values = self._read(fields)
            layers = {
                id(p): (m, records.get(id(m), ForwardRecord()))
                for m in clone.modules()
                for p in m.parameters(recurse=False)
            }
        return f.detach(), values, layers

    # -- shared public methods -------------------------------------------------
    @preserve_model_gradients
    def jacobians(
        self, x: Input, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians `(batch, n_outputs, P)` and outputs `(batch, n_outputs)`."""
        if enable_backprop:
            return super().jacobians(x, enable_backprop=True)
        from backpack.extensions import BatchGrad

        with self._session(x, ["grad_batch"]) as clone:
            f, _ = self._forward(clone, x)
            flat = f.reshape(f.shape[0], -1)
            n_out = flat.shape[1]
            cols = []
            for k in range(n_out):
                retain = k < n_out - 1
                self._backward(flat[:, k].sum(), BatchGrad(), retain_graph=retain)
                grads = self._read(["grad_batch"])["grad_batch"]
                cols.append(torch.cat([g.flatten(start_dim=1) for g in grads], dim=1))
        Js = torch.stack(cols, dim=1)
        return self._restrict(Js), flat.detach()

    @preserve_model_gradients
    def gradients(self, x: Input, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients `(batch, P)` of ``factor * loss_n`` and the loss `()`."""
        from backpack.extensions import BatchGrad

        y = self._targets(y)
        f, values, _ = self._run(x, y, BatchGrad())
        Gs = torch.cat([g.flatten(start_dim=1) for g in values["grad_batch"]], dim=1)
        return self._restrict(self.factor * Gs), self._loss(f, y)


class BackPackGGN(BackPackInterface, GGNInterface):
    """GGN via BackPACK; Monte-Carlo Fisher with ``stochastic=True``.

    ``full``: ``SqrtGGNExact`` / ``SqrtGGNMC`` (``G = V V^T``); ``diag``:
    ``DiagGGNExact`` / ``DiagGGNMC``; ``kron``: ``KFLR`` / ``KFAC``.  Sampling
    follows ``generator`` when given.  ``mc_samples`` is an alias of
    ``num_samples``.

    BackPACK's convolution KFAC pairs the exact bias GGN (``G``) with the
    unfolded-input covariance summed over the ``T`` output positions; ``A`` is
    divided by ``T`` here so that the product has the scale of KFAC-expand
    (Grosse & Martens' KFC), as for CurvlinopsGGN and AsdlGGN.
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
            stochastic=stochastic,
            num_samples=num_samples,
            **kwargs,
        )

    @preserve_model_gradients
    def full(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and GGN `(P, P)` from BackPACK's GGN square root."""
        from backpack.extensions import SqrtGGNExact, SqrtGGNMC

        y = self._targets(y)
        ext = (
            SqrtGGNMC(mc_samples=self.num_samples)
            if self.stochastic
            else SqrtGGNExact()
        )
        f, values, _ = self._run(x, y, ext)
        # [columns, batch, *shape] per parameter -> rows (columns * batch) x P
        V = torch.cat([v.flatten(start_dim=2) for v in values[ext.savefield]], dim=2)
        V = self._restrict(V.flatten(end_dim=1))
        return self._loss(f, y), self.factor * (V.T @ V)

    @preserve_model_gradients
    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and GGN diagonal `(P,)`."""
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        y = self._targets(y)
        ext = (
            DiagGGNMC(mc_samples=self.num_samples)
            if self.stochastic
            else DiagGGNExact()
        )
        f, values, _ = self._run(x, y, ext)
        dg = torch.cat([d.flatten() for d in values[ext.savefield]])
        return self._loss(f, y), self._restrict(self.factor * dg)

    @preserve_model_gradients
    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """Loss `()` and KFAC (``KFLR``, or MC ``KFAC`` when stochastic).

        Blocks ``[G, A]`` per weight and ``[G]`` per bias in parameter order,
        ``A`` normalised by the data set size ``N`` and ``G`` summed.
        """
        from backpack.extensions import KFAC, KFLR

        self._no_subnetwork_kron()
        N = check_data_size(N)
        _check_kfac_layers(self._module)
        y = self._targets(y)
        ext = KFAC(mc_samples=self.num_samples) if self.stochastic else KFLR()
        f, values, layers = self._run(x, y, ext)
        # BackPACK divides A by the batch size; the convention divides by N.
        batch_over_N = f.shape[0] / N
        blocks = []
        for p, factors in zip(self.params, values[ext.savefield]):
            layer, record = layers[id(p)]
            G = self.factor * factors[0]
            if len(factors) == 1:
                blocks.append([G])
                continue
            A = factors[1] * batch_over_N
            if isinstance(layer, nn.Conv2d):
                A = A / record.spatial_size()
            blocks.append([G, A])
        return self._loss(f, y), Kron(blocks)


class BackPackEF(BackPackInterface, EFInterface):
    """Empirical Fisher via BackPACK.

    ``full``: per-sample gradients (``BatchGrad``); ``diag``:
    ``SumGradSquared``.  BackPACK has no Kronecker-factored empirical Fisher.
    """

    @preserve_model_gradients
    def diag(self, x: Input, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """Loss `()` and empirical Fisher diagonal `(P,)`."""
        from backpack.extensions import SumGradSquared

        y = self._targets(y)
        f, values, _ = self._run(x, y, SumGradSquared())
        dg = torch.cat([d.flatten() for d in values["sum_grad_squared"]])
        return self._loss(f, y), self._restrict(self.factor**2 * dg)

    def kron(self, x: Input, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            "Unavailable through Backpack: BackPACK has no Kronecker-factored "
            "empirical Fisher. Use CurvlinopsEF or AsdlEF for "
            "hessian_structure='kron'."
        )


def _extend_loss(lossfunc: nn.Module) -> nn.Module:
    from backpack import extend

    return extend(copy.deepcopy(lossfunc))
