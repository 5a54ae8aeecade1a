"""Last-layer Laplace: a posterior over the weights of the last linear layer only,
the rest of the network a fixed feature map."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from laplace.base import atomic, eval_mode
from laplace.last_layer_checkpoint import LastLayerCheckpointMixin
from laplace.parametric.base import ParametricLaplace
from laplace.parametric.diag import DiagLaplace
from laplace.parametric.fast_glm import (
    Block,
    diag_blocks,
    full_last_layer_variance,
    identity_output_variance,
    kron_blocks,
    weight_variance,
)
from laplace.parametric.full import FullLaplace
from laplace.parametric.kron import KronLaplace
from laplace.parametric.sampling import affine_samples, outputs_under_weights
from laplace.signatures import KRON_LAST_LAYER, LAST_LAYER, constructor
from laplace.utils.autograd_mode import autograd_enabled
from laplace.utils.data import batch_size
from laplace.utils.feature_extractor import FeatureExtractor, LastLayerRollbackMixin
from laplace.utils.model_checks import (
    check_extractor_output,
    check_untied_last_layer,
)

__all__ = ["LLLaplace", "FullLLLaplace", "KronLLLaplace", "DiagLLLaplace"]


class LLLaplace(LastLayerCheckpointMixin, LastLayerRollbackMixin, ParametricLaplace):
    """Base class of last-layer Laplace approximations.

    The model is wrapped in a :class:`FeatureExtractor` around a deep copy, so the
    user's model is never touched. The last layer is ``last_layer_name`` or, when
    ``None``, found automatically on the first batch of ``fit``.

    Parameters
    ----------
    feature_reduction : FeatureReduction or str, optional
        Reduce features ``(batch, *middle, dim)`` (e.g. ``(batch, seq, dim)``) to
        ``(batch, dim)``: 'pick_first' / 'pick_last' (index 0 / -1 of every
        middle dim) or 'average' (mean over them); see :class:`FeatureExtractor`.
    last_layer_name : str, optional
    """

    __init__ = constructor(LAST_LAYER)

    def _setup(self, options: dict[str, Any]) -> None:
        model = options["model"]
        if options["asdl_fisher_kwargs"] is not None:
            raise ValueError("asdl_fisher_kwargs must be None for last-layer Laplace.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model)}.")
        extractor = FeatureExtractor(
            deepcopy(model),
            last_layer_name=options["last_layer_name"],
            enable_backprop=options["enable_backprop"],
            feature_reduction=options["feature_reduction"],
        )
        # as given (None: found on the first batch); saved as in laplace-torch
        self._last_layer_name = options["last_layer_name"]
        self._first_batch: list | None = None
        super()._setup({**options, "model": extractor})

    def _init_params(self) -> None:
        if self.model.last_layer is None:
            # found on the first batch of fit(); until then H is None
            self.params, self.mean, self.H = [], self.prior_mean, None
            return
        check_untied_last_layer(
            self.model.model, self.model.last_layer, self.model.last_layer_name
        )
        super()._init_params()

    def _treated_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.last_layer.parameters() if p.requires_grad]

    def _backend_init_kwargs(self) -> dict[str, Any]:
        return {**super()._backend_init_kwargs(), "last_layer": True}

    @atomic
    @autograd_enabled
    def fit(
        self, train_loader: Iterable, override: bool = True, progress_bar: bool = False
    ) -> None:
        """See :meth:`ParametricLaplace.fit`; an unknown last layer is found on the
        first batch (and forgotten again when the fit fails)."""
        try:
            if self.model.last_layer is None:
                X, _ = next(self._batches(train_loader), (None, None))
                if X is None:
                    raise ValueError("train_loader yielded no batches.")
                with torch.no_grad(), eval_mode(self.model):
                    out, phi = self.model.find_last_layer_with_features(X)
                self._remember_pass(X, out, phi)
                self._use_found_last_layer()
            super().fit(train_loader, override=override, progress_bar=progress_bar)
        finally:
            self._last_pass = None

    def _use_found_last_layer(self) -> None:
        """Treat the parameters of the last layer just set (new backend too)."""
        self._backend = None
        self._init_params()

    # A forward pass gives outputs and features at once: fit needs the outputs
    # of the first batch (to find the last layer and the number of outputs) and
    # the features of every batch, so the first pass is kept for the next use.
    def _remember_pass(self, X: Any, out: torch.Tensor, phi: torch.Tensor) -> None:
        if isinstance(X, torch.Tensor) and not self.enable_backprop:
            self._last_pass = (X, out, phi)

    def _recalled_pass(self, X: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        kept = getattr(self, "_last_pass", None)
        if kept is None or not isinstance(X, torch.Tensor):
            return None
        Y = kept[0]
        same = Y is X or (
            Y.shape == X.shape
            and Y.dtype == X.dtype
            and Y.device == X.device
            and torch.equal(Y, X)
        )
        return kept[1:] if same else None

    def _outputs_and_features(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        recalled = self._recalled_pass(X)
        if recalled is not None:
            return recalled
        with torch.no_grad():
            out, phi = self.model.forward_with_features(X)
        self._remember_pass(X, out, phi)
        return out, phi

    def _model_outputs(self, X: Any) -> torch.Tensor:
        return self._outputs_and_features(X)[0]

    def _laplace_outputs(self, X: Any) -> Any:
        out, phi = self._outputs_and_features(X)
        return check_extractor_output(self.model, out, phi, self.likelihood)

    def _check_outputs_once(self, x: Any) -> None:
        super()._check_outputs_once(x)
        self._last_pass = None  # only fit reuses a pass

    def _features(self, X: Any) -> torch.Tensor:
        recalled = self._recalled_pass(X)
        if recalled is not None:
            self._last_pass = None  # each batch's features are used once
            return recalled[1]
        # kept in the model's dtype: the last layer (and the backend) consume them
        with torch.set_grad_enabled(self.enable_backprop):
            return self.model.forward_with_features(X)[1]

    def _curv_closure(
        self, X: Any, y: torch.Tensor, N: int
    ) -> tuple[torch.Tensor, Any]:
        features = self._features(X)
        if not self._likelihood_model.is_pair_batch(features):
            return super()._curv_closure(features, y, N)
        # Preference pairs (batch, 2, n_features): the curvature is that of a
        # classifier whose two logits are the rewards of the pair's items.
        backend = self._backend
        self._backend = self._pair_backend()
        try:
            return super()._curv_closure(features, y, N)
        finally:
            self._backend = backend

    def _pair_backend(self) -> Any:
        cls = self._backend_cls or self._default_backend()
        return cls(
            _PairRewards(self.model.last_layer),
            self._likelihood_model.pair_likelihood,
            dict_key_x=self.dict_key_x,
            dict_key_y=self.dict_key_y,
            **self.backend_kwargs,
        )

    def _jacobians(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._jacobians_and_output(x)

    def _jacobians_and_output(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer Jacobians and outputs of one forward pass over the batch
        (for features ``(batch, seq, D)`` reduced to ``(batch, D)``: the last
        layer applied to the reduced features)."""
        if self._likelihood_model.pairs:
            with torch.set_grad_enabled(self.enable_backprop):
                out, features = self.model.forward_with_features(x)
            if self._likelihood_model.is_pair_batch(features):
                # preference pairs: Jacobians of both logits
                Js, _ = self._pair_backend().jacobians(
                    features, enable_backprop=self.enable_backprop
                )
                return Js.to(self._dtype), out
        Js, f = self.backend.last_layer_jacobians(
            x, enable_backprop=self.enable_backprop
        )
        return Js.to(self._dtype), f

    def _nn_output_chunks(
        self, x: Any, n_samples: int, generator: Any, model_kwargs: dict[str, Any]
    ) -> Iterator[torch.Tensor]:
        """Last-layer outputs ``(rows, batch, n_outputs)`` per chunk of weight
        samples; the body runs once, a linear last layer takes all samples of a
        chunk in one product."""
        layer = self.model.last_layer
        linear = type(layer) is nn.Linear
        outputs = batch_size(x, self.dict_key_x) * self.n_outputs
        rows = self.sample_chunk_elements // max(
            1, 4 * outputs if linear else self.n_params
        )
        self._check_nn_memory(x, min(n_samples, max(1, rows)))
        phi = self._features(x)
        rows = None
        if linear:
            # also bound the chunk's outputs (rows, batch, n_outputs), of which a
            # few copies (product, softmax) live at once
            n_rows = phi.numel() // phi.shape[-1]
            per_row = 4 * n_rows * layer.out_features
            rows = max(1, self.sample_chunk_elements // per_row)

        def forward() -> torch.Tensor:
            return layer(phi)

        for thetas in self._weight_sample_chunks(n_samples, generator, rows):
            values = self._unflatten_rows(thetas)
            if not linear:
                yield outputs_under_weights(layer, self.params, values, forward)
                continue
            sampled = {id(p): v for p, v in zip(self.params, values)}
            weight = sampled.get(id(layer.weight), layer.weight)
            bias = layer.bias
            yield affine_samples(phi, weight, sampled.get(id(bias), bias))

    def functional_variance_fast(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive mean ``f_mu`` ``(batch, n_outputs)`` (the network output)
        and the diagonal of its variance ``f_var`` ``(batch, n_outputs)``, in
        closed form from the features (no Jacobians) for full, Kron and diagonal
        posteriors; ``__call__`` uses the same route."""
        self._check_fitted()
        X = self._to_device(X)
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            moments = self._glm_predictive_distribution(X, diagonal_output=True)
        return self._to_output(moments)

    def _glm_fast_route(
        self, x: Any, diagonal: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        layer = self.model.last_layer
        if type(layer) is not nn.Linear:
            return None
        out, phi = self.model.forward_with_features(x)
        f = out if out.ndim == 2 else layer(phi)
        if phi.ndim != 2:
            return None
        return f, self._last_layer_variance(phi.to(self._dtype), diagonal)

    def _last_layer_variance(self, phi: torch.Tensor, diagonal: bool) -> torch.Tensor:
        """GLM variance of ``f = W phi + b`` from features ``phi (batch, D)``:
        ``(batch, O, O)``, or ``(batch, O)`` with ``diagonal``. Here ``J_n`` is the
        identity kron ``phi_n``, so each block only needs ``phi`` rotated into its
        input basis (see :mod:`laplace.parametric.fast_glm`)."""
        var = 0
        for param, block in zip(self.params, self._last_layer_blocks()):
            if param.ndim >= 2:
                var = var + weight_variance(block, phi.unsqueeze(1), None, diagonal)
            else:
                w = block.inv.expand(len(phi), -1)
                var = var + identity_output_variance(block.out_basis, w, diagonal)
        return var

    def _last_layer_blocks(self) -> list[Block]:
        raise NotImplementedError


class _PairRewards(nn.Module):
    """Rewards of both items of preference pairs as two logits: features
    ``(batch, 2, n_features)`` -> ``(batch, 2)``; shares the layer's parameters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(features).squeeze(-1)


class FullLLLaplace(LLLaplace, FullLaplace):
    """Last-layer Laplace with a dense posterior precision."""

    _key = ("last_layer", "full")

    def _last_layer_variance(self, phi: torch.Tensor, diagonal: bool) -> torch.Tensor:
        # blocks of Sigma contracted with phi; rows chunked to bound the
        # (rows, O, O, D) intermediate
        names = [
            n for n, p in self.model.last_layer.named_parameters() if p.requires_grad
        ]
        O, D = self.n_outputs, phi.shape[1]
        rows = max(1, self.glm_chunk_elements // (O * O * D))
        cov = self.posterior_covariance
        return torch.cat(
            [
                full_last_layer_variance(
                    chunk, cov, O, "weight" in names, "bias" in names, diagonal
                )
                for chunk in phi.split(rows)
            ]
        )


class KronLLLaplace(LLLaplace, KronLaplace):
    """Last-layer Laplace with a Kronecker-factored posterior precision.

    Parameters as :class:`LLLaplace`, plus ``damping`` (after
    ``last_layer_name``), as in :class:`~laplace.KronLaplace`.
    """

    _key = ("last_layer", "kron")

    def _last_layer_blocks(self) -> list[Block]:
        return kron_blocks(self._posterior_precision)

    __init__ = constructor(KRON_LAST_LAYER)


class DiagLLLaplace(LLLaplace, DiagLaplace):
    """Last-layer Laplace with a diagonal posterior precision."""

    _key = ("last_layer", "diag")

    def _last_layer_blocks(self) -> list[Block]:
        return diag_blocks(self.posterior_variance, self.params)
