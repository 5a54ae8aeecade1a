"""Checks and copies shared by the checkpoints of every Laplace class.

``load_state_dict`` validates a state dict completely before it assigns anything:
its type, the required keys, the type, shape and finiteness of each entry and
the hyperparameters (through the classes' own setters, run on a scratch copy).
``state_dict`` returns copies (:func:`detached_copy`), so editing it never
changes the live posterior.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from laplace.hyperparameters import HYPERPARAMETERS

__all__ = [
    "CheckpointMixin",
    "COMMON_KEYS",
    "StateDictKeyError",
    "check_state_dict",
    "tensor_entry",
    "symmetric_entry",
    "integer_entry",
    "bool_entry",
    "loss_entry",
    "history_entry",
    "validated_hyperparameters",
    "detached_copy",
    "inputs_entry",
    "model_inputs_entry",
]


class StateDictKeyError(KeyError, ValueError):
    """A required entry of a state dict is missing: both a ``KeyError`` (a missing
    key) and a ``ValueError`` (an invalid argument)."""

    def __str__(self) -> str:
        # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def check_state_dict(state_dict: Any, cls_name: str, required: Iterable[str]) -> None:
    """Check that ``state_dict`` is a mapping with every key of ``required`` and
    was saved by class ``cls_name``.

    Raises
    ------
    TypeError
        ``state_dict`` is not a mapping.
    StateDictKeyError
        Keys are missing (named in the message).
    ValueError
        ``state_dict['cls_name']`` differs from ``cls_name``.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict (as returned by state_dict()); got "
            f"{type(state_dict).__name__}."
        )
    # the class first: a state dict of another class also misses keys
    saved = state_dict.get("cls_name", cls_name)
    if saved != cls_name:
        raise ValueError(
            f"State dict has cls_name={saved!r} (saved from another class); cannot "
            f"load it into {cls_name}."
        )
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise StateDictKeyError(
            f"State dict for {cls_name} is missing keys {missing}; expected a dict "
            f"returned by {cls_name}.state_dict()."
        )


def tensor_entry(
    value: Any,
    name: str,
    shape: tuple[int, ...] | None = None,
    *,
    like: torch.Tensor | None = None,
    nonnegative: bool = False,
) -> torch.Tensor:
    """A finite floating-point tensor entry of the given ``shape``, copied onto
    the device and dtype of ``like`` when given.

    Raises
    ------
    TypeError
        Not a floating-point tensor.
    ValueError
        Wrong shape, NaN/Inf, or (``nonnegative``) negative values.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(
            f"State dict entry {name!r} must be a floating-point tensor; got {got}."
        )
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"State dict entry {name!r} has shape {tuple(value.shape)}; this model "
            f"and structure need {tuple(shape)}."
        )
    checked = value.detach()
    if not torch.isfinite(checked).all():
        raise ValueError(f"State dict entry {name!r} contains NaN or Inf.")
    if nonnegative and (checked < 0).any():
        raise ValueError(
            f"State dict entry {name!r} must be non-negative; its smallest value "
            f"is {float(checked.min())}."
        )
    if like is None:
        return checked.clone()
    return checked.to(device=like.device, dtype=like.dtype, copy=True)


def symmetric_entry(value: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` ``(n, n)``, checked to be symmetric up to rounding (relative
    tolerance ``sqrt(eps)`` of its dtype): curvature is."""
    tol = torch.finfo(value.dtype).eps ** 0.5 * float(value.abs().max())
    if float((value - value.mT).abs().max()) > tol:
        raise ValueError(f"State dict entry {name!r} is not symmetric.")
    return value


def integer_entry(value: Any, name: str, minimum: int = 0) -> int:
    """An integer entry (not bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"State dict entry {name!r} must be an int; got {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(
            f"State dict entry {name!r} must be at least {minimum}; got {value}."
        )
    return int(value)


def bool_entry(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"State dict entry {name!r} must be a bool; got {type(value).__name__}."
        )
    return value


def loss_entry(value: Any, like: torch.Tensor) -> torch.Tensor:
    """The summed training loss: a finite, non-negative number or 0-d tensor."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = torch.tensor(float(value))
    loss = tensor_entry(value, "loss", like=like, nonnegative=True)
    if loss.numel() != 1:
        raise ValueError(
            f"State dict entry 'loss' must be a scalar; got shape {tuple(loss.shape)}."
        )
    return loss.reshape(())


def history_entry(value: Any, name: str = "fit_history") -> dict[str, list]:
    """A fit history: a dict of lists (of numbers), copied."""
    if not isinstance(value, Mapping) or not all(
        isinstance(key, str) and isinstance(item, list | tuple)
        for key, item in value.items()
    ):
        raise TypeError(
            f"State dict entry {name!r} must be a dict of lists; got "
            f"{type(value).__name__}."
        )
    return {key: list(item) for key, item in value.items()}


def validated_hyperparameters(la: Any, state_dict: Mapping) -> dict[str, Any]:
    """The entries :data:`HYPERPARAMETERS` of ``state_dict``, validated by the
    setters of ``la``'s class on a scratch copy (so ``la`` is untouched): the
    values those setters store."""
    scratch = copy.copy(la)
    for name in HYPERPARAMETERS:
        try:
            # a copy: the setters may keep the very tensor they are given
            setattr(scratch, name, detached_copy(state_dict[name]))
        except (TypeError, ValueError) as error:
            kind = TypeError if isinstance(error, TypeError) else ValueError
            raise kind(f"State dict entry {name!r} is invalid: {error}") from error
    return {name: getattr(scratch, name) for name in HYPERPARAMETERS}


def detached_copy(value: Any) -> Any:
    """Copy of nested tensors, lists, tuples and mappings (mappings become plain
    dicts, which ``torch.load(..., weights_only=True)`` accepts); other values
    as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached_copy(item) for item in value)
    return value


def inputs_entry(value: Any, name: str) -> None:
    """Saved model inputs: a tensor or a dict of tensors, without NaN/Inf."""
    tensors = list(value.values()) if isinstance(value, Mapping) else [value]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(
            f"State dict entry {name!r} must be a tensor or a dict of tensors; got "
            f"{type(value).__name__}."
        )
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"State dict entry {name!r} contains NaN or Inf.")


@contextmanager
def model_inputs_entry(name: str) -> Iterator[None]:
    """Run the model on inputs saved in entry ``name``: an error of the model
    (e.g. inputs of another shape) means the entry does not fit this model."""
    try:
        yield
    except Exception as error:
        raise ValueError(
            f"State dict entry {name!r} does not fit this model: the model fails on "
            f"it ({type(error).__name__}: {error})."
        ) from error


#: Entries every Laplace class saves (with ``n_params``, ``likelihood``,
#: ``cls_name`` and the class's own).
COMMON_KEYS = (
    "loss",
    "prior_mean",
    "prior_precision",
    "sigma_noise",
    "n_data",
    "n_outputs",
    "temperature",
    "enable_backprop",
)


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of every Laplace class, written once.

    A class lists its required keys (:meth:`_required_keys`), saves its own
    entries (:meth:`_own_entries`), checks what must agree before anything else
    (:meth:`_check_saved_setting`), may prepare the object
    (:meth:`_prepare_load`, e.g. set the last layer) and turns its validated
    entries into the attributes to assign (:meth:`_loaded_state`). A load
    validates every entry before it assigns anything; a failing load leaves the
    object unchanged (``load_state_dict`` is a transaction).
    """

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the fitted posterior, as copies (editing
        the dict never changes this object); only tensors, numbers, strings,
        lists and dicts, so it loads with ``torch.load(..., weights_only=True)``."""
        self._check_fitted()
        common = {
            "loss": torch.as_tensor(self.loss),
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "n_data": int(self.n_data),
            "n_outputs": int(self.n_outputs),
            "likelihood": self.likelihood.value,
            "temperature": float(self.temperature),
            "enable_backprop": bool(self.enable_backprop),
            "cls_name": type(self).__name__,
            "n_params": int(self.n_params),
        }
        return detached_copy(self._own_entries(common))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of the same class.

        Raises
        ------
        TypeError
            ``state_dict`` is not a dict, or an entry has the wrong type.
        StateDictKeyError
            A required key is missing (a ``KeyError`` and a ``ValueError``).
        ValueError
            Another class, likelihood or model, an entry whose shape does not fit
            this model, NaN/Inf values, or invalid hyperparameters. Nothing is
            changed then.
        """
        with self._transaction():
            check_state_dict(state_dict, type(self).__name__, self._required_keys())
            self._check_saved_setting(state_dict)
            self._prepare_load(state_dict)
            like = torch.empty(0, device=self._device, dtype=self._dtype)
            common = self._validated_common(state_dict, like)
            self._commit({**common, **self._loaded_state(state_dict, like)})
            self._after_load(state_dict)

    # ---- hooks -------------------------------------------------------------------------
    def _required_keys(self) -> list[str]:
        return [*COMMON_KEYS, "likelihood", "cls_name"]

    def _own_entries(self, common: dict[str, Any]) -> dict[str, Any]:
        """The whole state dict from the ``common`` entries."""
        return common

    def _check_saved_setting(self, state_dict: dict[str, Any]) -> None:
        """What must agree before any entry is read (likelihood, class)."""
        if state_dict["likelihood"] != self.likelihood.value:
            raise ValueError(
                f"State dict has likelihood={state_dict['likelihood']!r}, this "
                f"{type(self).__name__} has {self.likelihood.value!r}."
            )

    def _prepare_load(self, state_dict: dict[str, Any]) -> None:
        """Hook run before the entries are validated (it may assign: a failing
        load is rolled back)."""

    def _loaded_state(self, state_dict: dict[str, Any], like: Tensor) -> dict:
        """The attributes to assign from the class's own entries, validated."""
        return {}

    def _after_load(self, state_dict: dict[str, Any]) -> None:
        """Hook run after the commit (e.g. recomputing Jacobians); still inside
        the transaction."""

    def _validated_common(self, state_dict: dict[str, Any], like: Tensor) -> dict:
        if "n_params" in state_dict:  # laplace-torch's state dicts lack it
            n_params = integer_entry(state_dict["n_params"], "n_params")
            if n_params != self.n_params:
                raise ValueError(
                    f"State dict holds a posterior over {n_params} parameters, this "
                    f"model has {self.n_params}: it comes from another model."
                )
        return {
            "loss": loss_entry(state_dict["loss"], like),
            "n_data": integer_entry(state_dict["n_data"], "n_data", minimum=1),
            "n_outputs": integer_entry(state_dict["n_outputs"], "n_outputs", 1),
            "enable_backprop": bool_entry(
                state_dict["enable_backprop"], "enable_backprop"
            ),
            **validated_hyperparameters(self, state_dict),
        }
